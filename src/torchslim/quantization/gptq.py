"""GPTQ weight-only quantization (Frantar et al. 2023): round-to-nearest plus layer-wise error compensation.

Columns of a Linear weight are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian of the layer's inputs (``H = 2 X X^T`` from calibration
activations, Cholesky form, blocks of columns updated lazily), so the layer's outputs change as little as
possible. Group scales (and zero points) are set from the already-updated weights when a group starts. The
codes, scales and zero points have exactly the format of round-to-nearest, so the result is an ordinary
:class:`~torchslim.quantization.backends.weight_only.WeightOnlyLinear` (same kernels, checkpoint and serving).
"""

from __future__ import annotations

import warnings
from typing import Iterable

import torch
from torch import nn

from ..data.calibration import calibration_runner
from ..nn.hessian import execution_order, inverse_cholesky, layer_hessian
from ..nn.bitpack import pack_bits
from .backends.weight_only import WeightOnlyLinear, quantize_groups

__all__ = ["gptq_codes", "gptq_layers"]


@torch.no_grad()
def gptq_codes(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
               damp: float = 0.01, block_size: int = 128, act_order: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of ``W`` ([out, in]) given its input Hessian ``H``: (uint8 codes [out, in], fp16 scales [out, groups],
    uint8 zero points or None), in the format of :func:`quantize_groups`.

    ``act_order`` quantizes the inputs with the largest Hessian diagonal first (while the most weights remain to
    absorb their error); group scales then come from the weights before any update (static groups), since a
    group's columns are no longer consecutive."""
    W = W.detach().double().clone()
    rows, cols = W.shape
    H = H.double().to(W.device)
    dead = torch.diag(H) == 0
    W[:, dead] = 0.0
    levels, half = 2 ** bits - 1, 2 ** (bits - 1)
    lo = 1 if symmetric else 0
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)
    if act_order:
        _, scales, zeros = quantize_groups(W, bits, group_size, symmetric)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    else:
        scales = torch.zeros(rows, cols // group_size, dtype=torch.float16, device=W.device)
        zeros = None if symmetric else torch.zeros(rows, cols // group_size, dtype=torch.uint8, device=W.device)
        perm = torch.arange(cols, device=W.device)
    U, _ = inverse_cholesky(H, damp)
    # Blocks hold whole groups, so a group's scale is set from weights that already carry every earlier update.
    block = group_size * max(1, block_size // group_size)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = int(perm[i1 + i])
            g = j // group_size
            if not act_order and j % group_size == 0:
                _, s, z = quantize_groups(W1[:, i:i + group_size], bits, group_size, symmetric)
                scales[:, g] = s[:, 0]
                if zeros is not None:
                    zeros[:, g] = z[:, 0]
            scale = scales[:, g].double()
            zero = torch.full_like(scale, half) if zeros is None else zeros[:, g].double()
            w = W1[:, i]
            u = torch.clamp(torch.round(w / scale) + zero, lo, levels)
            q = (u - zero) * scale
            codes[:, j] = u.to(torch.uint8)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return codes, scales, zeros


def gptq_layers(model: nn.Module, layers: dict[str, tuple[nn.Linear, int]], data: Iterable | None, *, bits: int,
                symmetric: bool, batches: int, damp: float, act_order: bool = False) -> dict[str, WeightOnlyLinear]:
    """Replace ``layers`` ({name: (Linear, group size)}) of ``model`` in place by GPTQ-quantized
    :class:`WeightOnlyLinear` layers (pass a copy), in execution order, so that later layers calibrate on the
    quantized outputs; returns the new layers by name. Layers the calibration batches never reach are rounded to
    nearest, with a warning naming them."""
    run = calibration_runner(model, data, batches, "WeightOnly(method='gptq')")
    plain = {name: linear for name, (linear, _) in layers.items()}
    out: dict[str, WeightOnlyLinear] = {}
    unreached: list[str] = []
    for name in execution_order(model, plain, run):
        linear, group_size = layers[name]
        H, seen = layer_hessian(linear, run, batches)
        if seen == 0:
            unreached.append(name)
            continue
        codes, scale, zero = gptq_codes(linear.weight, H, bits, group_size, symmetric, damp, act_order=act_order)
        q = WeightOnlyLinear(linear.in_features, linear.out_features, linear.bias is not None, bits=bits,
                             group_size=group_size, symmetric=symmetric)
        with torch.no_grad():
            q.packed.copy_(pack_bits(codes.cpu(), bits))
            q.scale.copy_(scale.cpu())
            if zero is not None:
                q.zero.copy_(zero.cpu())
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        out[name] = q.to(linear.weight.device)
        # Swapped rather than written into the Linear's weight, which may be shared (tied embeddings).
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, out[name])
    if unreached:
        warnings.warn(f"WeightOnly(method='gptq'): the calibration batches never reach {unreached}; they are "
                      "rounded to nearest instead", RuntimeWarning, stacklevel=3)
    return out
