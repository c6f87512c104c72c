"""Pruning masks of ``torch.nn.utils.prune``: which tensors carry one, and what a layer computes with.

A masked tensor ``weight`` is stored as the parameter ``weight_orig`` and the buffer ``weight_mask``; the
attribute ``weight`` is only a cache of their product, refreshed by a forward pass.
"""

from __future__ import annotations

from typing import Iterator

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


def effective_chunks(module: nn.Module, size: int, name: str = "weight") -> Iterator[torch.Tensor]:
    """:func:`effective` flattened, in pieces of ``size`` elements (detached), without materialising the whole
    ``orig * mask`` product."""
    orig, mask = getattr(module, f"{name}_orig", None), getattr(module, f"{name}_mask", None)
    if orig is None or mask is None:
        yield from getattr(module, name).detach().reshape(-1).split(size)
        return
    for o, m in zip(orig.detach().reshape(-1).split(size), mask.reshape(-1).split(size)):
        yield o * m


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


def attach_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Mask ``module.<name>`` as ``prune.custom_from_mask`` does, with the mask kept as the given bool tensor.

    ``custom_from_mask`` multiplies the mask into a float tensor of ones, so a pruned layer would carry a float
    mask as large as its weight; a bool one is a quarter of that and computes the same ``orig * mask``.
    """
    if masked_names(module).count(name) or not isinstance(getattr(module, name, None), nn.Parameter):
        prune.custom_from_mask(module, name, mask)  # already masked, or not a parameter: torch's own path
        return
    method = prune.CustomFromMask(mask)
    method._tensor_name = name
    orig = module._parameters.pop(name)
    module.register_parameter(f"{name}_orig", orig)
    module.register_buffer(f"{name}_mask", mask.to(device=orig.device, dtype=torch.bool))
    # The cached product, without autograd: a graph would keep a float copy of the mask alive with it (the
    # forward pre-hook recomputes it, with gradients when training).
    with torch.no_grad():
        setattr(module, name, method.apply_mask(module))
    module.register_forward_pre_hook(method)
