"""The loss contract of every training path: ``loss_fn(outputs, batch) -> scalar tensor``, or a named task.

Named tasks: ``"cross_entropy"`` (the default: outputs against the batch's target), ``"mse"`` (regression) and
``"model_loss"`` (the model computes its own loss, ``outputs.loss`` or ``outputs["loss"]``, as Hugging Face models
do when their inputs include ``labels``). ``batch`` is the batch as the loader yields it, on the model's device.
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..core.errors import ConfigError, DataError
from ..data.batches import output_tensor, split_batch

__all__ = ["Loss", "LossFn", "TASKS", "resolve_loss", "cross_entropy", "mse", "model_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]
"""``loss_fn(outputs, batch) -> scalar tensor``."""


@dataclasses.dataclass(frozen=True)
class Loss:
    """A resolved loss, called as ``loss(outputs, batch)``. ``needs_target``: it reads the batch's target;
    ``keep_labels``: the model must also get a dict batch's labels (it computes the loss itself)."""

    fn: LossFn
    name: str
    needs_target: bool = False
    keep_labels: bool = False

    def __call__(self, outputs: Any, batch: Any) -> torch.Tensor:
        return self.fn(outputs, batch)


def _target(batch: Any, task: str) -> Any:
    _, target = split_batch(batch)
    if target is None:
        raise DataError(f"loss_fn={task!r} compares the outputs with the batch's target, but the batch has none: "
                        "yield (inputs, target) or a dict with 'labels', or pass a loss_fn(outputs, batch) that "
                        "needs no target")
    return target


def cross_entropy(outputs: Any, batch: Any) -> torch.Tensor:
    """Cross-entropy of the outputs (their ``logits`` for dict outputs) against the batch's class targets."""
    return F.cross_entropy(output_tensor(outputs), _target(batch, "cross_entropy"))


def mse(outputs: Any, batch: Any) -> torch.Tensor:
    """Mean squared error of the outputs against the batch's (float) targets."""
    out = output_tensor(outputs)
    target = _target(batch, "mse").to(out.dtype)
    if target.shape != out.shape and target.numel() == out.numel():
        target = target.reshape(out.shape)  # (N,) targets for (N, 1) outputs would otherwise broadcast to (N, N)
    return F.mse_loss(out, target)


def model_loss(outputs: Any, batch: Any) -> torch.Tensor:
    """The loss the model computed itself: ``outputs["loss"]`` or ``outputs.loss``."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else getattr(outputs, "loss", None)
    if not torch.is_tensor(loss):
        raise DataError("loss_fn='model_loss' reads the loss the model returns (outputs.loss or outputs['loss']), "
                        f"but its {type(outputs).__name__} output has none: give the model its labels (dict batches "
                        "with 'labels') or pass another loss_fn")
    return loss


_TASKS = {
    "cross_entropy": Loss(cross_entropy, "cross_entropy", needs_target=True),
    "mse": Loss(mse, "mse", needs_target=True),
    "model_loss": Loss(model_loss, "model_loss", keep_labels=True),
}
TASKS = tuple(_TASKS)


def _legacy(fn: Callable) -> bool:
    """True for the old three-argument form ``loss_fn(outputs, targets, inputs)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    return len(positional) == 3


def resolve_loss(loss_fn: LossFn | str | None) -> Loss:
    """The :class:`Loss` for ``loss_fn``: None (cross-entropy), a task name or a callable ``(outputs, batch)``."""
    if loss_fn is None:
        return _TASKS["cross_entropy"]
    if isinstance(loss_fn, Loss):
        return loss_fn
    if isinstance(loss_fn, str):
        if loss_fn not in _TASKS:
            raise ConfigError(f"loss_fn must be one of {list(TASKS)} or a callable loss_fn(outputs, batch), "
                              f"got {loss_fn!r}")
        return _TASKS[loss_fn]
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be a callable loss_fn(outputs, batch) or one of {list(TASKS)}, got "
                          f"{type(loss_fn).__name__}")
    name = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    if _legacy(loss_fn):
        warnings.warn("loss_fn(outputs, targets, inputs) is deprecated; write loss_fn(outputs, batch) and take "
                      "inputs and target from the batch (torchslim.data.split_batch)", DeprecationWarning,
                      stacklevel=3)
        old = loss_fn

        def adapted(outputs: Any, batch: Any) -> torch.Tensor:
            inputs, target = split_batch(batch)
            return old(outputs, target, inputs)

        return Loss(adapted, name)
    return Loss(loss_fn, name)
