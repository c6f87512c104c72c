"""A compressed model in its fastest form for inference: pruning masks folded into the weights and
weight-coded layers (shared or integer codes) decoded into the plain float layers they compute as.

Compression stores a model compactly; running it that way costs time on every call (a mask product per
forward, a codebook lookup and cache check per layer). :func:`for_inference` pays those costs once, so a
size-only compression runs as fast as the model it came from, with exactly the same outputs.

A layer takes part by defining ``inference_module(self) -> nn.Module | None``: the float module it
computes as (``None`` keeps it, e.g. when it has no exact float equivalent), with ``inference_packed = True``
on layers whose codes hold less memory than their float weight (kept with ``keep_packed=True``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from .masks import masked_names
from .modules import copy_model

__all__ = ["for_inference", "fold_masks", "inference_ready", "float_layer"]


def fold_masks(model: nn.Module) -> int:
    """Fold every ``torch.nn.utils.prune`` mask of ``model`` into its tensor (in place; zeros stay zeros,
    the reparametrisation and its forward pre-hook go). Returns how many masks were folded."""
    n = 0
    for module in model.modules():
        for name in masked_names(module):
            prune.remove(module, name)
            n += 1
    return n


def for_inference(model: nn.Module, *, keep_packed: bool = False, inplace: bool = False) -> nn.Module:
    """``model`` (a copy unless ``inplace``) in eval mode with pruning masks folded and weight-coded layers
    decoded to float (``keep_packed=True`` keeps the layers whose codes take less memory than floats, e.g.
    low-bit integer layers, at the cost of decoding them); gradients are switched off. Outputs are exactly
    those of ``model`` in eval mode. Not for further training: pruned weights are no longer held at zero."""
    if not inplace:
        model = copy_model(model)
    fold_masks(model)
    model = _replace(model, keep_packed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def inference_ready(model: nn.Module, *, keep_packed: bool = False) -> bool:
    """Whether :func:`for_inference` would leave ``model`` as it is (no masks, no layer to decode)."""
    return not any(masked_names(m) or _convertible(m, keep_packed) for m in model.modules())


def float_layer(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """The ``nn.Linear`` / ``nn.ConvNd`` with ``module``'s layer attributes (``in_features``... or
    ``in_channels``, ``kernel_size``...) computing with ``weight`` and ``bias`` (copied, no gradients)."""
    with torch.device("meta"):  # the real tensors are put in below; skip a throw-away initialisation
        if hasattr(module, "in_features"):
            new: nn.Module = nn.Linear(module.in_features, module.out_features, bias is not None)
        else:
            cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[weight.dim() - 3]
            new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                      module.dilation, module.groups, bias is not None, getattr(module, "padding_mode", "zeros"))
    new.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return new.train(module.training)


def _convertible(module: nn.Module, keep_packed: bool) -> bool:
    hook = getattr(module, "inference_module", None)
    return callable(hook) and not (keep_packed and getattr(module, "inference_packed", False))


def _replace(module: nn.Module, keep_packed: bool) -> nn.Module:
    if _convertible(module, keep_packed):
        with torch.no_grad():
            new = module.inference_module()
        if new is not None:
            return new
    for name, child in list(module._modules.items()):
        if child is not None:
            new = _replace(child, keep_packed)
            if new is not child:
                module._modules[name] = new
    return module
