"""N:M semi-structured sparsity (2:4 by default): masks, packed checkpoint storage and the CUDA kernel path.

- :func:`semi_structured_prune` keeps ``n`` of every ``m`` consecutive inputs of each weight row, chosen by
  magnitude, OBD saliency or SparseGPT reconstruction; the masks are ``torch.nn.utils.prune`` masks, so they
  stay fixed while the model fine-tunes.
- The ``"nm"`` checkpoint encoding stores such a tensor as its kept values (``n/m`` of them) plus, per group of
  ``m``, the index of its kept-position pattern among the ``C(m, n)`` possible ones, bit-packed (3 bits per group
  of 4 for 2:4, 0.75 bits per weight; two 2-bit positions per group would take 1 bit per weight, no smaller
  than the generic bitmask encoding). Exact round trip.
- :func:`accelerate_semi_structured` swaps N:M weights for ``torch.sparse.to_sparse_semi_structured`` ones on
  CUDA, layer by layer, only where that measures faster than the dense matmul. CPUs have no such kernel: there
  2:4 saves storage, not time.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import UnsupportedModelError
from ..export.checkpoint import Encoding
from ..nn.bitpack import pack_bits, unpack_bits
from ..nn.masks import effective
from ..nn.modules import check_patterns
from ..training.losses import LossFn
from .config import SemiStructuredPruning
from .obs import _nm_block_mask, obs_prune
from .unstructured import _check_finite, apply_masks, hessian_scores, layer_sparsity, prunable_layers, untied

__all__ = ["semi_structured_prune", "nm_masks", "is_nm", "encode_nm", "decode_nm", "accelerate_semi_structured",
           "CODECS"]


def _rows(module: nn.Module) -> int:
    return module.weight[0].numel()


def nm_masks(scores: dict[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """Keep masks holding the ``n`` highest of ``scores`` in every ``m`` consecutive entries of each row."""
    out = {}
    for name, s in scores.items():
        rows = s.reshape(s.shape[0], -1)
        out[name] = (~_nm_block_mask(rows.float(), n, m)).reshape(s.shape)
    return out


def is_nm(t: torch.Tensor, n: int, m: int) -> bool:
    """Whether every row of ``t`` (dimension 0 first, the rest flattened) has at most ``n`` non-zeros in each run
    of ``m``."""
    rows = t.reshape(t.shape[0], -1)
    if rows.shape[1] % m:
        return False
    return bool((rows.reshape(rows.shape[0], -1, m) != 0).sum(-1).le(n).all())


def semi_structured_prune(model: nn.Module, config: SemiStructuredPruning, *, data=None,
                          loss_fn: LossFn | str | None = None) -> dict[str, float]:
    """Mask ``model`` in place to the ``config.n``:``config.m`` pattern; returns per-layer sparsity."""
    check_patterns(f"{type(config).__name__}.exclude", config.exclude, prunable_layers(model), "Linear/Conv")
    candidates = untied(model, prunable_layers(model, config.exclude), type(config).__name__)
    layers = {k: v for k, v in candidates.items() if _rows(v) % config.m == 0}
    odd = sorted(set(candidates) - set(layers))
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Linear/Conv layer whose rows are a multiple of "
                                    f"m={config.m} long (after exclude={list(config.exclude)}); layers seen: "
                                    f"{sorted(candidates) or 'none'}")
    if odd:
        warnings.warn(f"{config.n}:{config.m} sparsity leaves {odd} dense: their weight rows are not a multiple of "
                      f"{config.m} long (add them to exclude= to silence this)", RuntimeWarning, stacklevel=3)
    _check_finite(layers)
    nm = (config.n, config.m)
    if config.method == "obs":
        def fallback(name: str, module: nn.Module) -> torch.Tensor:
            return nm_masks({name: effective(module).detach().abs()}, *nm)[name]
        masks = obs_prune(model, layers, data, nm=nm, batches=config.calibration_batches, damp=config.damp,
                          what="SemiStructuredPruning(method='obs')", fallback=fallback)
    else:
        score = hessian_scores(model, layers, data, loss_fn, config.calibration_batches) \
            if config.method == "hessian" else (lambda name, module: effective(module).detach().abs())
        masks = nm_masks({name: score(name, module) for name, module in layers.items()}, *nm)
    apply_masks(layers, masks)
    return {k: v for k, v in layer_sparsity(model, config.exclude).items() if k in layers}


# ----------------------------------------------------------------------------------------------
# The "nm" checkpoint encoding


_GROUPS = (4, 8)  # group lengths the encoding looks for (2:4, 1:4, 4:8, ...)
_MIN_ELEMENTS = 64  # smaller tensors gain nothing over the per-part overhead


def _patterns(m: int, n: int) -> torch.Tensor:
    """All ``C(m, n)`` kept-position patterns of a group as m-bit integers, in lexicographic order."""
    return torch.tensor([sum(1 << p for p in c) for c in itertools.combinations(range(m), n)], dtype=torch.int64)


def _pattern_width(m: int, n: int) -> int:
    return max(1, math.ceil(math.log2(math.comb(m, n))))


def encode_nm(t: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Kept values plus a pattern code per group of ``m`` consecutive elements, for float tensors in which every
    group of 4 (or else 8) holds at most ``n <= m / 2`` non-zeros (N:M sparsity); None for other tensors (denser
    groups are left to the other encodings, without the pattern tables' memory)."""
    if not t.is_floating_point() or t.dim() < 2 or t.numel() < _MIN_ELEMENTS:
        return None
    flat = t.reshape(-1)
    for m in _GROUPS:
        if flat.numel() % m:
            continue
        groups = flat.reshape(-1, m)
        nz = groups != 0
        count = nz.sum(-1, keepdim=True, dtype=torch.int8)
        n = int(count.max())
        if 2 * n > m or n == 0:
            continue
        # Groups with fewer than n non-zeros keep their first zeros as well, so every group has n slots.
        fill = (~nz).cumsum(-1, dtype=torch.int8) <= (n - count)
        kept = nz | (fill & ~nz)
        bits = (kept.to(torch.uint8) << torch.arange(m, dtype=torch.uint8)).sum(-1, dtype=torch.int64)
        table = torch.full((1 << m,), -1, dtype=torch.int64)
        patterns = _patterns(m, n)
        table[patterns] = torch.arange(patterns.numel())
        codes = table[bits]
        width = _pattern_width(m, n)
        return ({"data": groups[kept].contiguous(), "meta": pack_bits(codes.to(torch.uint8), width)},
                {"m": m, "n": n})
    return None


def decode_nm(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    """Inverse of :func:`encode_nm`; malformed fields raise ValueError."""
    m, n = entry["m"], entry["n"]
    if type(m) is not int or type(n) is not int or m not in _GROUPS or not 0 < n < m:
        raise ValueError(f"invalid N:M pattern n={n!r}, m={m!r}")
    numel = math.prod(entry["shape"])
    if numel % m:
        raise ValueError(f"{numel} elements do not split into groups of {m}")
    groups = numel // m
    values, meta = parts["data"], parts["meta"]
    if values.numel() != groups * n or meta.dtype != torch.uint8:
        raise ValueError(f"expected {groups * n} kept values and uint8 pattern codes")
    width = _pattern_width(m, n)
    if meta.numel() != (groups * width + 7) // 8:
        raise ValueError(f"{meta.numel()} bytes of pattern codes, not the {(groups * width + 7) // 8} expected")
    codes = unpack_bits(meta, width, groups).long()
    patterns = _patterns(m, n)
    if groups and int(codes.max()) >= patterns.numel():
        raise ValueError(f"a pattern code points past the {patterns.numel()} patterns of {n}:{m}")
    kept = (patterns[codes].unsqueeze(-1) >> torch.arange(m)) & 1
    out = torch.zeros(groups, m, dtype=values.dtype)
    out[kept.bool()] = values.reshape(-1)
    return out.reshape(entry["shape"])


CODECS = (Encoding("nm", encode_nm, decode_nm),)
"""Checkpoint support of N:M sparse weights (registered by ``torchslim.techniques``)."""


# ----------------------------------------------------------------------------------------------
# CUDA semi-structured kernels


class SemiStructuredLinear(nn.Module):
    """A Linear layer computing with a ``torch.sparse`` semi-structured (2:4) weight on CUDA."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = nn.Parameter(to_sparse_semi_structured(effective(linear).detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def _time(fn, x: torch.Tensor, repeats: int = 50) -> float:
    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats * 1e3


@torch.no_grad()
def accelerate_semi_structured(model: nn.Module, rows: int = 64, min_speedup: float = 1.0) -> dict[str, dict]:
    """Replace each 2:4-sparse fp16/bf16 Linear of ``model`` (on CUDA) by a :class:`SemiStructuredLinear` where
    its matmul on ``rows`` input rows measures at least ``min_speedup`` times faster than the dense one.

    Returns {layer: {"dense_ms", "sparse_ms", "used"} or {"reason"}}. On a CPU-only model it raises
    UnsupportedModelError: PyTorch has no semi-structured CPU kernel, so 2:4 gives no speed-up there."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cuda":
        raise UnsupportedModelError("2:4 semi-structured kernels run on CUDA GPUs (sparse tensor cores, compute "
                                    f"capability 8.0+); the model is on {device}. On CPU 2:4 sparsity saves storage "
                                    "only, with no speed-up")
    report: dict[str, dict] = {}
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        w = effective(module).detach()
        if w.dtype not in (torch.float16, torch.bfloat16) or not is_nm(w, 2, 4):
            report[name] = {"reason": "needs a 2:4-sparse fp16/bf16 weight"}
            continue
        x = torch.randn(rows, module.in_features, device=device, dtype=w.dtype)
        try:
            sparse = SemiStructuredLinear(module)
            dense_ms, sparse_ms = _time(lambda v: F.linear(v, w, module.bias), x), _time(sparse, x)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
            report[name] = {"reason": f"kernel failed: {' '.join(str(exc).split())[:160]}"}
            continue
        used = dense_ms / sparse_ms >= min_speedup
        report[name] = {"dense_ms": dense_ms, "sparse_ms": sparse_ms, "used": used}
        if used:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, sparse)
    return report
