"""Pruning: unstructured masks (magnitude, OBD, SparseGPT), N:M semi-structured masks, structured channel
removal (with schedules) and learned sparsity (sparse variational dropout)."""

from __future__ import annotations

from torch import nn

from ..core.errors import ConfigError
from ..core.history import record
from ..data.batches import as_example_inputs
from ..metrics.evaluate import Metric
from ..nn.attention import PrunedMultiheadAttention
from ..nn.modules import copy_model
from ..training.losses import LossFn
from .config import Schedule, SemiStructuredPruning, StructuredPruning, UnstructuredPruning
from .graph import build_groups
from .importance import Importance, bn_l1_penalty, register_importance
from .oprules import register_op_rule
from .nm import accelerate_semi_structured, semi_structured_prune
from .schedule import run_semi_structured, run_structured, run_unstructured
from .structured import masked_like, structured_prune
from .unstructured import layer_sparsity, make_permanent, unstructured_prune
from .variational import VariationalDropout, variational_prune

__all__ = ["prune", "UnstructuredPruning", "StructuredPruning", "SemiStructuredPruning", "Schedule",
           "semi_structured_prune", "accelerate_semi_structured", "layer_sparsity", "make_permanent",
           "structured_prune", "unstructured_prune", "masked_like", "build_groups", "bn_l1_penalty",
           "Importance", "register_importance", "register_op_rule", "VariationalDropout",
           "variational_prune", "PrunedMultiheadAttention"]


def prune(model: nn.Module, config: UnstructuredPruning | StructuredPruning | SemiStructuredPruning
          | VariationalDropout, *, data=None,
          val_data=None, example_inputs=None, loss_fn: LossFn | str | None = None, metric: Metric | None = None,
          inplace: bool = False) -> nn.Module:
    """Prune ``model`` as ``config`` says and return the pruned model (a copy unless ``inplace``).

    ``example_inputs`` (a tensor, a tuple of positional inputs or a dict of keyword inputs) is needed to trace
    the model for structured pruning; ``data`` (any batch form of :mod:`torchslim.data.batches`) feeds
    fine-tuning schedules, Taylor / Hessian importance and the calibration of ``method="obs"``, with ``loss_fn``
    (default cross-entropy); ``metric`` is measured on ``val_data`` after each fine-tuning epoch.
    ``VariationalDropout`` trains on ``data`` and masks the weights it learned to drop. The config is recorded in
    the model's history.
    """
    if not isinstance(config, (UnstructuredPruning, StructuredPruning, SemiStructuredPruning, VariationalDropout)):
        raise ConfigError(f"prune() takes UnstructuredPruning, StructuredPruning, SemiStructuredPruning or "
                          f"VariationalDropout, got "
                          f"{type(config).__name__}")
    if isinstance(config, StructuredPruning) and example_inputs is None:
        raise ConfigError("structured pruning traces the model: pass example_inputs= (a batch of inputs: a tensor, "
                          "a tuple of positional inputs or a dict of keyword inputs)")
    if isinstance(config, StructuredPruning) and config.hidden_ratio:
        raise ConfigError("StructuredPruning.hidden_ratio prunes the hidden size of transformers models (through "
                          "torchslim.prune / torchslim.hf); this model is not one: set hidden_ratio=0")
    if not inplace:
        model = copy_model(model)
    if isinstance(config, SemiStructuredPruning):
        run_semi_structured(model, config, data, val_data, loss_fn=loss_fn, metric=metric)
    elif isinstance(config, VariationalDropout):
        variational_prune(model, config, data, val_data, loss_fn=loss_fn, metric=metric)
    elif isinstance(config, UnstructuredPruning):
        run_unstructured(model, config, data, val_data, loss_fn=loss_fn, metric=metric)
    else:
        run_structured(model, config, as_example_inputs(example_inputs), data, val_data, loss_fn=loss_fn,
                       metric=metric)
    return record(model, config)
