"""Pruning: unstructured magnitude masks and structured channel removal, with schedules."""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError
from ..nn.modules import copy_model
from .config import Schedule, StructuredPruning, UnstructuredPruning
from .graph import build_groups
from .importance import Importance, bn_l1_penalty, register_importance
from .oprules import register_op_rule
from .schedule import run_structured, run_unstructured
from .structured import masked_like, structured_prune
from .unstructured import layer_sparsity, make_permanent, unstructured_prune

__all__ = ["prune", "UnstructuredPruning", "StructuredPruning", "Schedule", "layer_sparsity", "make_permanent",
           "structured_prune", "unstructured_prune", "masked_like", "build_groups", "bn_l1_penalty",
           "Importance", "register_importance", "register_op_rule"]


def prune(model: nn.Module, config: UnstructuredPruning | StructuredPruning, *, example_inputs: tuple | None = None,
          data=None, val_data=None, inplace: bool = False) -> nn.Module:
    """Prune ``model`` as ``config`` says and return the pruned model (a copy unless ``inplace``).

    ``example_inputs`` (a tuple of tensors) is needed to trace the model for structured pruning;
    ``data`` (a loader of ``(inputs, targets)``) feeds fine-tuning schedules and Taylor importance;
    ``val_data`` is evaluated after each fine-tuning epoch.
    """
    if not inplace:
        model = copy_model(model)
    if isinstance(config, UnstructuredPruning):
        run_unstructured(model, config, data, val_data)
    elif isinstance(config, StructuredPruning):
        if example_inputs is None:
            raise ConfigError("structured pruning traces the model: pass example_inputs=(a batch of inputs,)")
        run_structured(model, config, tuple(example_inputs), data, val_data)
    else:
        raise ConfigError(f"prune() takes UnstructuredPruning or StructuredPruning, got {type(config).__name__}")
    return model
