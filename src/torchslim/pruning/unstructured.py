"""Unstructured pruning (magnitude, OBD saliency or SparseGPT reconstruction) through ``torch.nn.utils.prune``
masks (weights stay zero while training)."""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.errors import ConfigError, UnsupportedModelError
from ..nn.masks import attach_mask, effective, effective_chunks
from ..nn.modules import check_patterns, match
from ..training.losses import LossFn
from .config import UnstructuredPruning
from .importance import fisher_diagonal, obd_saliency
from .obs import obs_prune

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Linear and Conv layers of ``model`` by name, minus those matching an ``exclude`` pattern."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and match(name, exclude) is None}


def untied(model: nn.Module, layers: dict[str, nn.Module], what: str) -> dict[str, nn.Module]:
    """``layers`` minus those whose weight another module shares (tied input/output embeddings): a mask, or an
    OBS reconstruction written into the shared tensor, would change the other module too. Those left dense are
    named in a warning."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(name)
    tied = {}
    for name, m in layers.items():
        others = [o for o in owners.get(id(_weight_param(m)), []) if o != name]
        if others:
            tied[name] = others[0]
    if tied:
        named = ", ".join(f"{n!r} (weight tied to {o!r})" for n, o in tied.items())
        warnings.warn(f"{what} leaves {named} dense: pruning a tied weight would change the module sharing it "
                      "too. Add it to exclude= to silence this, or untie the weights (e.g. "
                      "config.tie_word_embeddings=False) to prune it.", RuntimeWarning, stacklevel=4)
    return {n: m for n, m in layers.items() if n not in tied}


def _check_finite(layers: dict[str, nn.Module]) -> None:
    for name, m in layers.items():
        # In chunks: isfinite over a whole layer allocates a temporary a quarter of its size.
        if not all(bool(torch.isfinite(c).all()) for c in effective_chunks(m, _CHUNK)):
            raise UnsupportedModelError(f"layer {name!r} has NaN/inf weights; magnitude pruning would be "
                                        "meaningless. Fix or retrain the model first.")


def _keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask keeping all but the ``n_prune`` smallest scores (exact count; ties across the threshold are
    settled as ``torch.topk`` settles them)."""
    if 0 < n_prune < scores.numel():
        threshold = _nth_smallest(lambda: scores.reshape(-1).split(_CHUNK), n_prune)
        # When the n smallest are exactly those at or below the n-th, they are the set topk picks; a tie across
        # the threshold leaves the choice to topk (below), so the masks never depend on which path ran.
        if threshold is not None and int(torch.count_nonzero(scores <= threshold)) == n_prune:
            return scores > threshold
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        # CPU topk holds a (value, int64 index) pair per element plus int64 indices of the result: ~7x the
        # scores for a 90% sparsity, hence the threshold search above.
        idx = torch.topk(scores.flatten(), n_prune, largest=False, sorted=False).indices
        mask[idx] = False
    return mask.view_as(scores)


_FLOAT32_INF_BITS = 0x7F800000
_LOW_BITS = 15  # the search counts the scores by their high bit pattern, then the low bits of one bucket
_CHUNK = 1 << 20  # elements per counting step, so the temporaries stay a few MB


def _nth_smallest(chunks: Callable[[], Iterable[torch.Tensor]], n: int) -> torch.Tensor | None:
    """The ``n``-th smallest of non-negative float32 scores (as a 0-dim tensor), or None for other scores.

    ``chunks()`` yields the scores in pieces, afresh on each call (two passes). Works on the bit patterns, which
    order like the values for non-negative floats: two counting passes (a histogram of the high bits, then of
    the low bits in the bucket holding the n-th), where sorting or ``kthvalue`` would copy the scores and an
    int64 index each.
    """
    high = torch.zeros((_FLOAT32_INF_BITS >> _LOW_BITS) + 1, dtype=torch.int64)
    for chunk in chunks():
        if chunk.dtype != torch.float32 or chunk.device.type != "cpu":
            return None
        bits = chunk.contiguous().view(torch.int32)
        if int(bits.min()) < 0 or int(bits.max()) > _FLOAT32_INF_BITS:  # -0.0, negatives or NaN
            return None
        high += torch.bincount(bits >> _LOW_BITS, minlength=high.numel())
    cum = high.cumsum(0)
    bucket = int(torch.searchsorted(cum, n))  # first bucket where the count reaches n
    low = torch.zeros(1 << _LOW_BITS, dtype=torch.int64)
    for chunk in chunks():
        bits = chunk.contiguous().view(torch.int32)
        low += torch.bincount(bits[(bits >> _LOW_BITS) == bucket] & ((1 << _LOW_BITS) - 1), minlength=low.numel())
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    rest = int(torch.searchsorted(low.cumsum(0) + below, n))
    return torch.tensor((bucket << _LOW_BITS) | rest, dtype=torch.int32).view(torch.float32)


def _abs_chunks(modules: list[nn.Module]) -> Callable[[], Iterator[torch.Tensor]]:
    """|weight| of ``modules`` (as they compute) in chunks of ``_CHUNK``, layer after layer."""
    def chunks() -> Iterator[torch.Tensor]:
        for m in modules:
            for c in effective_chunks(m, _CHUNK):
                yield c.abs()
    return chunks


def _keep_masks(layers: dict[str, nn.Module], n_prune: int) -> dict[str, torch.Tensor]:
    """Boolean masks over ``layers`` together keeping all but the ``n_prune`` smallest magnitudes.

    For float32 weights on the CPU the threshold is searched on the weights in chunks and each mask is filled
    chunk by chunk, so no copy of the scores is made. Weights equal to the threshold, when more of them than
    needed, are pruned first come first (layer order, then element order): ``torch.topk`` over all the scores
    would settle that tie in an unspecified way at ~7x the memory. Other weights go through :func:`_keep_top`."""
    modules = list(layers.values())
    total = sum(m.weight.numel() for m in modules)
    threshold = _nth_smallest(_abs_chunks(modules), n_prune) if 0 < n_prune < total else None
    if threshold is not None:
        ties = n_prune - sum(int(torch.count_nonzero(c < threshold)) for c in _abs_chunks(modules)())
        masks = {}
        for name, m in layers.items():
            mask = torch.empty(m.weight.numel(), dtype=torch.bool, device=m.weight.device)
            for part, c in zip(mask.split(_CHUNK), _abs_chunks([m])()):
                torch.gt(c, threshold, out=part)
                equal = (c == threshold).nonzero().flatten()
                part[equal[ties:]] = True  # the first ``ties`` equal ones are pruned, the rest kept
                ties = max(0, ties - equal.numel())
            masks[name] = mask.view(m.weight.shape)
        return masks
    # One buffer filled layer by layer: a list of |w| copies plus their torch.cat would hold the scores twice.
    flat = torch.empty(total, device=modules[0].weight.device,
                       dtype=functools.reduce(torch.promote_types, (m.weight.dtype for m in modules)))
    offset = 0
    for m in modules:
        w = effective(m).detach()
        torch.abs(w, out=flat[offset:offset + w.numel()].view_as(w))
        offset += w.numel()
        del w
    keep = _keep_top(flat, n_prune)
    del flat
    masks, offset = {}, 0
    for n, m in layers.items():
        size = m.weight.numel()
        # A copy each: a mask must not keep the whole buffer alive, nor share memory with another layer's.
        masks[n] = keep[offset:offset + size].view_as(m.weight).clone()
        offset += size
    return masks


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float | dict[str, float],
                    scope: str, scores: Callable[[str, nn.Module], torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Boolean masks that zero the smallest-magnitude weights, ``scope="global"`` across all ``layers``;
    ``scores(name, module)`` ranks by another non-negative saliency instead of |w|."""
    if scores is not None:
        return _score_masks(layers, sparsity, scope, scores)
    if isinstance(sparsity, dict):
        _check_names(sparsity, layers)
        return {n: _keep_masks({n: layers[n]}, round(s * layers[n].weight.numel()))[n] for n, s in sparsity.items()}
    if scope == "layer":
        return {n: _keep_masks({n: m}, round(sparsity * m.weight.numel()))[n] for n, m in layers.items()}
    return _keep_masks(layers, round(sparsity * sum(m.weight.numel() for m in layers.values())))


def _score_masks(layers: dict[str, nn.Module], sparsity: float | dict[str, float], scope: str,
                 scores: Callable[[str, nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
    if isinstance(sparsity, dict) or scope == "layer":
        rates = sparsity if isinstance(sparsity, dict) else dict.fromkeys(layers, sparsity)
        return {n: _keep_top(scores(n, layers[n]).contiguous(), round(s * layers[n].weight.numel()))
                for n, s in rates.items()}
    flat = torch.cat([scores(n, m).reshape(-1) for n, m in layers.items()])
    keep = _keep_top(flat, round(sparsity * flat.numel()))
    masks, offset = {}, 0
    for n, m in layers.items():
        masks[n] = keep[offset:offset + m.weight.numel()].view_as(m.weight)
        offset += m.weight.numel()
    return masks


def _weight_param(module: nn.Module) -> nn.Parameter:
    return module.weight_orig if hasattr(module, "weight_orig") else module.weight


def hessian_scores(model: nn.Module, layers: dict[str, nn.Module], data, loss_fn: LossFn | str | None,
                   batches: int) -> Callable[[str, nn.Module], torch.Tensor]:
    """OBD saliency ``w^2 * F_jj / 2`` of every weight of ``layers`` (``F`` the Fisher diagonal on ``data``)."""
    fisher = fisher_diagonal(model, {n: _weight_param(m) for n, m in layers.items()}, data, loss_fn, batches,
                             what="UnstructuredPruning(method='hessian')")
    saliency = {n: obd_saliency(effective(m), fisher[n]) for n, m in layers.items()}
    return lambda name, module: saliency[name]


def _rates(layers: dict[str, nn.Module], sparsity: float | dict[str, float], scope: str) -> dict[str, float]:
    """Each layer's sparsity: given, uniform (``scope="layer"``) or set by the global magnitude ranking."""
    if isinstance(sparsity, dict):
        return dict(sparsity)
    if scope == "layer":
        return dict.fromkeys(layers, sparsity)
    masks = magnitude_masks(layers, sparsity, scope)
    return {n: 1.0 - float(k.float().mean()) for n, k in masks.items()}


def obs_masks(model: nn.Module, layers: dict[str, nn.Module], sparsity: float | dict[str, float], scope: str,
              data, config) -> dict[str, torch.Tensor]:
    """SparseGPT masks (the surviving weights reconstructed in place) for ``layers`` at ``sparsity``."""
    rates = _rates(layers, sparsity, scope)

    def fallback(name: str, m: nn.Module) -> torch.Tensor:
        return _keep_top(effective(m).detach().abs(), round(rates[name] * m.weight.numel()))

    return obs_prune(model, {n: layers[n] for n in rates}, data, rates=rates, batches=config.calibration_batches,
                     damp=config.damp, what=f"{type(config).__name__}(method='obs')", fallback=fallback)


def _check_names(sparsity: dict[str, float], layers: dict[str, nn.Module]) -> None:
    unknown = sorted(set(sparsity) - set(layers))
    if unknown:
        raise ConfigError(f"sparsity names unknown or excluded layer(s) {unknown}; prunable layers: {sorted(layers)}")


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Attach (or tighten) ``torch.nn.utils.prune`` masks, kept as bool; already-zeroed weights stay zero."""
    for name, mask in masks.items():
        module = layers[name]
        if hasattr(module, "weight_mask"):
            module.weight_mask.mul_(mask.to(module.weight_mask.dtype))
        else:
            attach_mask(module, mask.to(torch.bool))


def unstructured_prune(model: nn.Module, config: UnstructuredPruning,
                       sparsity: float | dict[str, float] | None = None, *, data=None,
                       loss_fn: LossFn | str | None = None) -> dict[str, float]:
    """Mask ``model`` in place to ``sparsity`` (default ``config.sparsity``) by ``config.method``; returns
    per-layer sparsity. ``data`` (and ``loss_fn``, for ``hessian``) feed the second-order methods."""
    check_patterns(f"{type(config).__name__}.exclude", config.exclude, prunable_layers(model), "Linear/Conv")
    layers = untied(model, prunable_layers(model, config.exclude), type(config).__name__)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no untied Linear/Conv layer to prune "
                                    f"(after exclude={list(config.exclude)})")
    _check_finite(layers)
    sparsity = config.sparsity if sparsity is None else sparsity
    if isinstance(sparsity, dict):
        _check_names(sparsity, layers)
    if config.method == "obs":
        masks = obs_masks(model, layers, sparsity, config.scope, data, config)
    else:
        scores = None if config.method == "magnitude" else hessian_scores(model, layers, data, loss_fn,
                                                                          config.calibration_batches)
        masks = magnitude_masks(layers, sparsity, config.scope, scores)
    apply_masks(layers, masks)
    del masks
    return layer_sparsity(model, config.exclude)


def layer_sparsity(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, float]:
    """Fraction of zero weights per prunable layer."""
    return {n: 1.0 - sum(int(torch.count_nonzero(c)) for c in effective_chunks(m, _CHUNK)) / m.weight.numel()
            for n, m in prunable_layers(model, exclude).items()}


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into the weights (``torch.nn.utils.prune.remove``); zeros stay, masks go."""
    for m in model.modules():
        if hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model
