"""The one batch contract: what a loader may yield, how a model is called with it, what example inputs are.

A batch is
- a tensor ``x`` (inputs only, no target);
- a tuple or list ``(inputs, target, ...)``, where ``inputs`` is a tensor, a tuple/list of positional tensors or a
  dict of keyword tensors (what a ``DataLoader`` makes of such samples);
- a dict in the Hugging Face style ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``: the model gets
  the dict minus the label key(s) as keyword arguments, the target is the label entry (None without one).

Model inputs are therefore a tensor (``model(x)``), a tuple (``model(*x)``) or a dict (``model(**x)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

import torch
from torch import nn

from ..core.errors import DataError, UnsupportedModelError

__all__ = ["LABEL_KEYS", "Inputs", "split_batch", "call_model", "to_device", "batch_size", "as_example_inputs",
           "select", "output_tensor"]

LABEL_KEYS = ("labels", "label")
"""Keys of a dict batch that hold the target, not a model input."""

Inputs = Union[torch.Tensor, tuple, dict]


def _inputs(x: Any, where: str) -> Inputs:
    if torch.is_tensor(x):
        return x
    if isinstance(x, (tuple, list)):
        return tuple(x)
    if isinstance(x, Mapping):
        return dict(x)
    raise DataError(f"{where} must be a tensor, a tuple of tensors or a dict of tensors, got {type(x).__name__}")


def split_batch(batch: Any, *, keep_labels: bool = False) -> tuple[Inputs, Any]:
    """``(inputs, target)`` of one batch (see the module docstring); ``target`` is None for unlabelled batches.

    ``keep_labels`` leaves the label entry of a dict batch in the inputs too, for models that compute their
    own loss from it (Hugging Face models given ``labels``)."""
    if torch.is_tensor(batch):
        return batch, None
    if isinstance(batch, Mapping):
        target = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        inputs = dict(batch) if keep_labels else {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        if not inputs:
            raise DataError(f"a dict batch needs at least one model input besides {list(LABEL_KEYS)}, got keys "
                            f"{list(batch)}")
        return inputs, target
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise DataError("a batch is an empty tuple; yield x, (inputs, target) or a dict of tensors")
        return _inputs(batch[0], "the inputs of a batch (its first element)"), batch[1] if len(batch) > 1 else None
    raise DataError(f"a batch must be a tensor, a tuple (inputs, target, ...) or a dict of tensors, got "
                    f"{type(batch).__name__}")


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(x)``, ``model(*x)`` or ``model(**x)`` for a tensor, tuple or dict ``inputs``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor in it (nested tuples, lists and dicts) moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple keeps its type
        return type(obj)(*(to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    values = obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (tuple, list)) else ()
    return [t for v in values for t in _tensors(v)]


def batch_size(inputs: Inputs) -> int:
    """Samples in ``inputs``: dimension 0 of its first tensor."""
    for t in _tensors(inputs):
        if t.dim() > 0:
            return int(t.shape[0])
    raise DataError(f"cannot tell the batch size of inputs of type {type(inputs).__name__}: they hold no tensor "
                    "with a batch dimension")


def select(inputs: Inputs, index: Any) -> Inputs:
    """``inputs`` with every tensor indexed along dimension 0 (``index``: a slice, list or index tensor)."""
    if torch.is_tensor(inputs):
        return inputs[index]
    if isinstance(inputs, Mapping):
        return {k: select(v, index) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return tuple(select(v, index) for v in inputs)
    return inputs


def as_example_inputs(example_inputs: Any) -> tuple | dict:
    """Example inputs as positional (a tuple) or keyword (a dict) model inputs.

    A plain tensor is ONE input (never split along its batch dimension), a tuple or list holds positional
    inputs and a dict keyword inputs."""
    if torch.is_tensor(example_inputs):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        return tuple(example_inputs)
    if isinstance(example_inputs, Mapping) and example_inputs:
        return dict(example_inputs)
    raise DataError(f"example_inputs must be a tensor (one input), a non-empty tuple of positional inputs or a "
                    f"non-empty dict of keyword inputs, got {example_inputs!r:.80}")


def output_tensor(outputs: Any) -> torch.Tensor:
    """The tensor a metric or a default loss reads from a model's outputs: the outputs themselves, the
    ``logits`` entry of a dict (or of a Hugging Face ``ModelOutput``), else its first tensor other than
    ``loss``, or the first element of a tuple."""
    if torch.is_tensor(outputs):
        return outputs
    if isinstance(outputs, Mapping):
        if torch.is_tensor(outputs.get("logits")):
            return outputs["logits"]
        for key, value in outputs.items():
            if key != "loss" and torch.is_tensor(value):
                return value
    elif isinstance(outputs, (tuple, list)) and outputs:
        return output_tensor(outputs[0])
    raise UnsupportedModelError(f"the model returned a {type(outputs).__name__} with no tensor to measure; return "
                                "a tensor, a tuple starting with one, or a dict with 'logits', or pass loss_fn= "
                                "and metric= that read your outputs")
