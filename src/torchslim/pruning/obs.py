"""One-shot pruning with layer-wise OBS reconstruction (SparseGPT, Frantar & Alistarh 2023).

Each layer's weights are pruned column block by column block; a pruned weight's error is spread over the not
yet processed weights of its row through the inverse Hessian ``H^-1`` of the layer's inputs (``H = 2 X X^T``
from calibration activations), so the layer's outputs change as little as possible. Masks are chosen per block
of ``block_size`` columns by the OBS saliency ``w^2 / [H^-1]_jj^2`` (adaptive mask selection), or per group of
``m`` inputs for N:M sparsity. No gradient and no fine-tuning is needed.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from ..core.errors import UnsupportedModelError
from ..data.calibration import calibration_runner
from ..nn.hessian import execution_order, inverse_cholesky, layer_hessian, unsupported_reason, weight_matrix
from ..nn.masks import effective

__all__ = ["sparsegpt", "obs_prune"]


def _nm_block_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight is pruned: the ``m - n`` lowest scores of each group of ``m`` columns."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, drop, True)
    return mask.reshape(rows, cols)


def _lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True for the ``count`` lowest scores (ties settled by ``torch.topk``)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        mask[torch.topk(scores.flatten(), count, largest=False).indices] = True
    return mask.view_as(scores)


@torch.no_grad()
def sparsegpt(W: torch.Tensor, H: torch.Tensor, *, sparsity: float = 0.0, nm: tuple[int, int] | None = None,
              pruned: torch.Tensor | None = None, damp: float = 0.01, block_size: int = 128
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``W`` ([out, in]) given its input Hessian ``H`` ([in, in]); returns (new weights, keep mask).

    ``sparsity``: share of weights pruned (per block of ``block_size`` columns, the exact count overall up to
    rounding); ``nm=(n, m)`` keeps ``n`` of every ``m`` consecutive inputs instead. ``pruned`` marks weights
    that must end up zero (an earlier mask). Weights are reconstructed in float64.
    """
    dtype = W.dtype
    W = W.detach().double().clone()
    rows, cols = W.shape
    U, dead = inverse_cholesky(H.double().to(W.device), damp)
    W[:, dead] = 0.0
    forced = torch.zeros_like(W, dtype=torch.bool) if pruned is None else pruned.to(W.device).bool().clone()
    forced[:, dead] = True
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    total = round(sparsity * W.numel()) if nm is None else 0
    done_cols, done_pruned = 0, 0
    if nm is not None:
        block_size = max(nm[1], block_size - block_size % nm[1])
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        scores = W1 ** 2 / d.reshape(1, -1) ** 2
        scores[forced[:, i1:i2]] = -1.0  # earlier zeros go first and stay pruned
        if nm is None:
            # This block's share of the layer's count, so rounding never accumulates across blocks.
            done_cols = i2
            count = round(total * done_cols / cols) - done_pruned
            m1 = _lowest(scores, count) | forced[:, i1:i2]
            done_pruned += int(m1.sum())
        else:
            m1 = _nm_block_mask(scores, *nm) | forced[:, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = torch.where(m1[:, i], torch.zeros_like(w), w)
            err = (w - q) / d[i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = m1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[mask] = 0.0
    return W.to(dtype), ~mask


def obs_prune(model: nn.Module, layers: dict[str, nn.Module], data: Iterable | None, *,
              rates: dict[str, float] | None = None, nm: tuple[int, int] | None = None, batches: int = 8,
              damp: float = 0.01, block_size: int = 128, what: str = "method='obs'",
              fallback: Callable[[str, nn.Module], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Prune ``layers`` of ``model`` in place, one at a time in execution order, with SparseGPT reconstruction
    from ``batches`` batches of ``data``; ``rates`` gives each layer's sparsity (or ``nm`` the N:M pattern).

    Returns the keep masks. A layer the reconstruction cannot handle (grouped conv, ...) gets
    ``fallback(name, module)``'s mask instead, with a warning naming it; without a fallback it is an error.
    """
    run = calibration_runner(model, data, batches, what)
    order = execution_order(model, layers, run)
    masks: dict[str, torch.Tensor] = {}
    fell_back: list[str] = []
    for name in order:
        module = layers[name]
        if nm is None and not (rates or {}).get(name, 0.0):
            continue
        reason = unsupported_reason(module)
        H, seen = (None, 0) if reason else layer_hessian(module, run, batches)
        if not reason and seen == 0:
            reason = "the calibration batches never reach it"
        if reason:
            if fallback is None:
                raise UnsupportedModelError(f"{what}: layer {name!r} cannot be reconstructed ({reason}); add it "
                                            "to exclude=")
            masks[name] = fallback(name, module)
            fell_back.append(f"{name} ({reason})")
        else:
            earlier = getattr(module, "weight_mask", None)
            pruned = None if earlier is None else weight_matrix(module, earlier) == 0
            new, keep = sparsegpt(weight_matrix(module, effective(module).detach()), H, nm=nm, pruned=pruned,
                                  sparsity=(rates or {}).get(name, 0.0), damp=damp, block_size=block_size)
            target = module.weight_orig if hasattr(module, "weight_orig") else module.weight
            target.data.copy_(new.reshape(target.shape))
            masks[name] = keep.reshape(target.shape)
        _zero_now(module, masks[name])
    if fell_back:
        warnings.warn(f"{what}: magnitude masks (no reconstruction) for {', '.join(fell_back)}", RuntimeWarning,
                      stacklevel=3)
    return masks


def _zero_now(module: nn.Module, keep: torch.Tensor) -> None:
    """Zero the pruned weights at once: later layers must see this layer's pruned outputs (sequential scheme)."""
    if hasattr(module, "weight_mask"):
        module.weight_mask.mul_(keep.to(module.weight_mask.dtype))
        module.weight = effective(module).detach()
    else:
        module.weight.data.mul_(keep.to(module.weight.dtype))
