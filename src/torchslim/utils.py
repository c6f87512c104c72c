"""Small helpers shared across techniques."""

from __future__ import annotations

import copy

import torch
from torch import nn


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies pruned models, without touching the original.

    ``torch.nn.utils.prune`` caches ``weight = weight_orig * weight_mask`` as a plain attribute, which is a
    non-leaf tensor after a forward pass with autograd, and deepcopy refuses those; a detached copy goes in
    its place (the next forward recomputes it anyway).
    """
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)
