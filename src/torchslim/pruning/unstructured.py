"""Unstructured magnitude pruning through ``torch.nn.utils.prune`` masks (weights stay zero while training)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.errors import ConfigError, UnsupportedModelError
from ..nn.masks import effective
from ..nn.modules import check_patterns, match
from .config import UnstructuredPruning

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Linear and Conv layers of ``model`` by name, minus those matching an ``exclude`` pattern."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, PRUNABLE) and match(name, exclude) is None}


def _check_finite(layers: dict[str, nn.Module]) -> None:
    for name, m in layers.items():
        if not torch.isfinite(effective(m).detach()).all():
            raise UnsupportedModelError(f"layer {name!r} has NaN/inf weights; magnitude pruning would be "
                                        "meaningless. Fix or retrain the model first.")


def _keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Boolean mask keeping all but the ``n_prune`` smallest scores (exact count, ties broken by index)."""
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        idx = torch.topk(scores.flatten(), n_prune, largest=False, sorted=False).indices
        mask[idx] = False
    return mask.view_as(scores)


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float | dict[str, float],
                    scope: str) -> dict[str, torch.Tensor]:
    """Masks that zero the smallest-magnitude weights, ``scope="global"`` across all ``layers``."""
    if isinstance(sparsity, dict):
        unknown = sorted(set(sparsity) - set(layers))
        if unknown:
            raise ConfigError(f"sparsity names unknown or excluded layer(s) {unknown}; prunable layers: "
                              f"{sorted(layers)}")
        return {n: _keep_top(effective(layers[n]).detach().abs(), round(s * layers[n].weight.numel()))
                for n, s in sparsity.items()}
    if scope == "layer":
        return {n: _keep_top(effective(m).detach().abs(), round(sparsity * m.weight.numel()))
                for n, m in layers.items()}
    flat = torch.cat([effective(m).detach().abs().flatten() for m in layers.values()])
    keep = _keep_top(flat, round(sparsity * flat.numel()))
    masks, offset = {}, 0
    for n, m in layers.items():
        size = m.weight.numel()
        masks[n] = keep[offset:offset + size].view_as(m.weight)
        offset += size
    return masks


def apply_masks(layers: dict[str, nn.Module], masks: dict[str, torch.Tensor]) -> None:
    """Attach (or tighten) ``torch.nn.utils.prune`` masks; already-zeroed weights stay zero."""
    for name, mask in masks.items():
        module = layers[name]
        if hasattr(module, "weight_mask"):
            module.weight_mask.mul_(mask.to(module.weight_mask.dtype))
        else:
            torch_prune.custom_from_mask(module, "weight", mask)


def unstructured_prune(model: nn.Module, config: UnstructuredPruning,
                       sparsity: float | dict[str, float] | None = None) -> dict[str, float]:
    """Mask ``model`` in place to ``sparsity`` (default ``config.sparsity``); returns per-layer sparsity."""
    check_patterns(f"{type(config).__name__}.exclude", config.exclude, prunable_layers(model), "Linear/Conv")
    layers = prunable_layers(model, config.exclude)
    if not layers:
        raise UnsupportedModelError(f"{type(model).__name__} has no Linear/Conv layer to prune "
                                    f"(after exclude={list(config.exclude)})")
    _check_finite(layers)
    masks = magnitude_masks(layers, config.sparsity if sparsity is None else sparsity, config.scope)
    apply_masks(layers, masks)
    return layer_sparsity(model, config.exclude)


def layer_sparsity(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, float]:
    """Fraction of zero weights per prunable layer."""
    return {n: 1.0 - torch.count_nonzero(effective(m).detach()).item() / m.weight.numel()
            for n, m in prunable_layers(model, exclude).items()}


def make_permanent(model: nn.Module) -> nn.Module:
    """Fold masks into the weights (``torch.nn.utils.prune.remove``); zeros stay, masks go."""
    for m in model.modules():
        if hasattr(m, "weight_mask"):
            torch_prune.remove(m, "weight")
    return model
