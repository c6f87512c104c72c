"""Pruning masks of ``torch.nn.utils.prune``: which tensors carry one, and what a layer computes with.

A masked tensor ``weight`` is stored as the parameter ``weight_orig`` and the buffer ``weight_mask``; the
attribute ``weight`` is only a cache of their product, refreshed by a forward pass.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune


def masked_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s own tensors that carry a pruning mask (e.g. ``["weight"]``)."""
    return [h._tensor_name for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]


def effective(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The tensor a layer computes with: ``<name>_orig * <name>_mask`` when masked, else ``<name>``.

    Read from the reparametrisation rather than the cached attribute, which lags one optimizer step behind
    until the next forward pass. Not detached: gradients flow to ``<name>_orig``.
    """
    orig, mask = getattr(module, f"{name}_orig", None), getattr(module, f"{name}_mask", None)
    if orig is not None and mask is not None:
        return orig * mask
    return getattr(module, name)


def effective_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``model.state_dict()`` with masks folded in (``orig * mask`` under the plain name, no ``_orig`` /
    ``_mask`` entries), and the sorted full names of the masked tensors."""
    raw = model.state_dict()
    folded: dict[str, str] = {}  # "<full>_orig" -> "<full>"
    for path, module in model.named_modules():
        for name in masked_names(module):
            full = f"{path}.{name}" if path else name
            if f"{full}_orig" in raw and f"{full}_mask" in raw:
                folded[f"{full}_orig"] = full
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key in folded:
            full = folded[key]
            state[full] = value * raw[f"{full}_mask"]
        elif not (key.endswith("_mask") and key[: -len("_mask")] + "_orig" in folded):
            state[key] = value
    return state, sorted(folded.values())
