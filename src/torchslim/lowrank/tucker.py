"""Tucker-2 decomposition of Conv2d kernels over the channel modes (Kim et al. 2016), via tensorly."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils import skip_init

from .svd import energy_rank


def _tensorly():
    try:
        import tensorly
        from tensorly import decomposition
    except ImportError:  # optional dependency
        raise ImportError("Tucker and CP decompositions need tensorly: pip install 'torchslim[lowrank]'") from None
    return tensorly, decomposition


def conv_weight64(conv: nn.Conv2d) -> np.ndarray:
    return conv.weight.detach().to("cpu", torch.float64).numpy()


def tucker_params(conv: nn.Conv2d, ranks: tuple[int, int]) -> int:
    r_in, r_out = ranks
    kh, kw = conv.kernel_size
    bias = conv.out_channels if conv.bias is not None else 0
    return conv.in_channels * r_in + r_in * r_out * kh * kw + r_out * conv.out_channels + bias


def tucker_max_ranks(conv: nn.Conv2d) -> tuple[int, int]:
    kh, kw = conv.kernel_size
    # A mode's rank cannot exceed the rank of its unfolding.
    return (min(conv.in_channels, conv.out_channels * kh * kw), min(conv.out_channels, conv.in_channels * kh * kw))


def tucker_energy_ranks(conv: nn.Conv2d, energy: float) -> tuple[int, int]:
    """(in_rank, out_rank): per mode, the smallest rank keeping ``energy`` of that unfolding's squared
    singular values (a simple, VBMF-free criterion)."""
    w = torch.from_numpy(conv_weight64(conv))
    cout, cin = w.shape[:2]
    s_out = torch.linalg.svdvals(w.reshape(cout, -1))
    s_in = torch.linalg.svdvals(w.transpose(0, 1).reshape(cin, -1))
    return energy_rank(s_in, energy), energy_rank(s_out, energy)


def tucker_rank_grid(conv: nn.Conv2d) -> list[tuple[int, int]]:
    """Rank pairs growing together in proportion to the channel counts (for ratio and sensitivity search)."""
    max_in, max_out = tucker_max_ranks(conv)
    steps = max(max_in, max_out)
    grid = []
    for j in range(1, steps + 1):
        pair = (max(1, min(max_in, round(j * max_in / steps))), max(1, min(max_out, round(j * max_out / steps))))
        if not grid or pair != grid[-1]:
            grid.append(pair)
    return grid


def tucker_conv(conv: nn.Conv2d, ranks: tuple[int, int], n_iter_max: int = 100) -> tuple[nn.Sequential, float]:
    """Tucker-2 of ``conv`` at ``ranks`` = (in_rank, out_rank) -> 1x1, k x k, 1x1 convolutions, and the
    relative reconstruction error of the kernel."""
    tl, decomposition = _tensorly()
    r_in, r_out = ranks
    w = conv_weight64(conv)
    with tl.backend_context("numpy"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tensorly warns when a rank reaches a full dimension
        result = decomposition.partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], n_iter_max=n_iter_max,
                                              init="svd", tol=1e-5)
    # tensorly >= 0.9 returns ((core, factors), errors); older versions (core, factors).
    core, factors = result[0] if isinstance(result[0], (tuple, list)) else result
    u_out, u_in = np.asarray(factors[0]), np.asarray(factors[1])
    core = np.asarray(core)
    approx = np.einsum("oikl,Oo,Ii->OIkl", core, u_out, u_in)
    error = float(np.linalg.norm(approx - w) / max(np.linalg.norm(w), 1e-300))

    kh, kw = conv.kernel_size
    first = skip_init(nn.Conv2d, conv.in_channels, r_in, 1, bias=False, dtype=torch.float64)
    middle = skip_init(nn.Conv2d, r_in, r_out, (kh, kw), stride=conv.stride, padding=conv.padding,
                       dilation=conv.dilation, bias=False, padding_mode=conv.padding_mode, dtype=torch.float64)
    last = skip_init(nn.Conv2d, r_out, conv.out_channels, 1, bias=conv.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        first.weight.copy_(torch.from_numpy(u_in.T.copy())[:, :, None, None])
        middle.weight.copy_(torch.from_numpy(core.copy()))
        last.weight.copy_(torch.from_numpy(u_out.copy())[:, :, None, None])
        if conv.bias is not None:
            last.bias.copy_(conv.bias.detach().double())
    ref = conv.weight
    return nn.Sequential(first, middle, last).to(device=ref.device, dtype=ref.dtype), error


__all__ = ["tucker_params", "tucker_max_ranks", "tucker_energy_ranks", "tucker_rank_grid", "tucker_conv"]
