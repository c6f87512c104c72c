"""CP decomposition of Conv2d kernels into pointwise / depthwise-separable convolutions
(Lebedev et al. 2015), fitted with tensorly's ALS."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from .tucker import _tensorly, conv_weight64


def cp_params(conv: nn.Conv2d, rank: int) -> int:
    kh, kw = conv.kernel_size
    bias = conv.out_channels if conv.bias is not None else 0
    return rank * (conv.in_channels + kh + kw + conv.out_channels) + bias


def cp_max_rank(conv: nn.Conv2d) -> int:
    """Upper bound on the CP rank of the (Cout, Cin, kh, kw) kernel: product of the dimensions over the largest."""
    dims = [conv.out_channels, conv.in_channels, *conv.kernel_size]
    return math.prod(dims) // max(dims)


def cp_to_sequence(conv: nn.Conv2d, weights: np.ndarray, factors: list[np.ndarray]) -> nn.Sequential:
    """Build ``Conv1x1(Cin, R)``, depthwise ``kh x 1``, depthwise ``1 x kw``, ``Conv1x1(R, Cout)`` from CP
    factors of the kernel: ``W[o, i, h, w] = sum_r weights[r] A[o, r] B[i, r] C[h, r] D[w, r]``.

    Each component's scale is spread evenly over its four factors so fine-tuning sees balanced magnitudes.
    """
    a, b, c, d = (np.asarray(f, dtype=np.float64) for f in factors)
    lam = np.asarray(weights, dtype=np.float64)
    norms = [np.linalg.norm(f, axis=0) for f in (a, b, c, d)]
    scale = np.abs(lam) * np.prod(norms, axis=0)
    share = scale ** 0.25
    safe = [np.where(n > 0, n, 1.0) for n in norms]
    a = a / safe[0] * share * np.sign(lam)
    b, c, d = (f / n * share for f, n in zip((b, c, d), safe[1:]))

    rank = lam.shape[0]
    kh, kw = conv.kernel_size
    sh, sw = conv.stride
    dh, dw = conv.dilation
    if conv.padding == "same":
        pad_h = pad_w = "same"  # per axis, 'same' pads exactly as the 2-D kernel would
    elif conv.padding == "valid":
        pad_h = pad_w = 0
    else:
        pad_h, pad_w = (conv.padding[0], 0), (0, conv.padding[1])
    f64 = torch.float64
    first = skip_init(nn.Conv2d, conv.in_channels, rank, 1, bias=False, dtype=f64)
    vertical = skip_init(nn.Conv2d, rank, rank, (kh, 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1),
                         groups=rank, bias=False, padding_mode=conv.padding_mode, dtype=f64)
    horizontal = skip_init(nn.Conv2d, rank, rank, (1, kw), stride=(1, sw), padding=pad_w, dilation=(1, dw),
                           groups=rank, bias=False, padding_mode=conv.padding_mode, dtype=f64)
    last = skip_init(nn.Conv2d, rank, conv.out_channels, 1, bias=conv.bias is not None, dtype=f64)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(b.T.copy())[:, :, None, None])
        vertical.weight.copy_(torch.from_numpy(c.T.copy())[:, None, :, None])
        horizontal.weight.copy_(torch.from_numpy(d.T.copy())[:, None, None, :])
        last.weight.copy_(torch.from_numpy(a.copy())[:, :, None, None])
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach().double())
    ref = conv.weight
    return nn.Sequential(first, vertical, horizontal, last).to(device=ref.device, dtype=ref.dtype)


def cp_conv(conv: nn.Conv2d, rank: int, n_iter_max: int = 300, tol: float = 1e-7,
            seed: int = 0) -> tuple[nn.Sequential, float]:
    """CP-decompose ``conv`` at ``rank``; returns the sequence and the kernel's relative reconstruction error."""
    tl, decomposition = _tensorly()
    w = conv_weight64(conv)
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SVD init pads ranks above a mode's size with random columns
        cp = decomposition.parafac(w, rank=rank, init="svd", n_iter_max=n_iter_max, tol=tol,
                                   random_state=seed)
    weights, factors = cp
    weights = np.asarray(weights)
    factors = [np.asarray(f) for f in factors]
    approx = np.einsum("r,or,ir,hr,wr->oihw", weights, *factors)
    error = float(np.linalg.norm(approx - w) / max(np.linalg.norm(w), 1e-300))
    return cp_to_sequence(conv, weights, factors), error


__all__ = ["cp_params", "cp_max_rank", "cp_to_sequence", "cp_conv"]
