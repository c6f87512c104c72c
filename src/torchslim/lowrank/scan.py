"""What decomposition measures on data: per-layer shapes (for MACs) and the metric with one layer swapped."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data.batches import call_model, output_tensor, split_batch, to_device
from ..core.errors import DataError
from ..metrics.evaluate import Metric, model_device
from ..nn.modules import copy_model

__all__ = ["record_shapes", "Scanner", "set_module"]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def record_shapes(model: nn.Module, names: list[str], example_inputs: tuple | dict) -> dict[str, tuple]:
    """Per-sample (input shape, output shape) of each named layer on ``example_inputs`` (a tuple or dict)."""
    shapes: dict[str, tuple] = {}

    def hook(name):
        def fn(module, inputs, output):
            shapes.setdefault(name, (tuple(inputs[0].shape[1:]), tuple(output.shape[1:])))
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, to_device(example_inputs, model_device(model)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return shapes


class Scanner:
    """``metric`` (default: top-1 accuracy) of (a private copy of) the original model on a few fixed batches,
    with one layer swapped for a candidate: each layer's sensitivity is measured alone, so drops of several
    layers roughly add up. A ``metric(model, loader)`` function gets the batches as a list."""

    def __init__(self, model: nn.Module, loader, batches: int, metric: Metric | None = None):
        self.model = copy_model(model)
        self.device = model_device(model)
        self.metric = metric
        self.batches: list[Any] = []
        for i, batch in enumerate(loader):
            if i >= batches:
                break
            if metric is None and split_batch(batch)[1] is None:
                raise DataError("the max_drop sensitivity scan measures accuracy: val_data must yield labelled "
                                "batches ((inputs, target) or dicts with 'labels'), or pass metric=")
            self.batches.append(to_device(batch, self.device))
        self.baseline = self.measure()

    def measure(self) -> float:
        was_training = self.model.training
        self.model.eval()
        try:
            return self._top1() if self.metric is None else float(self.metric(self.model, self.batches))
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def _top1(self) -> float:
        correct = total = 0
        for batch in self.batches:
            inputs, y = split_batch(batch)
            correct += (output_tensor(call_model(self.model, inputs)).argmax(1) == y).sum().item()
            total += y.numel()
        return correct / max(total, 1)

    def drop_with(self, name: str, candidate: nn.Module) -> float:
        original = self.model.get_submodule(name)
        set_module(self.model, name, candidate)
        try:
            return self.baseline - self.measure()
        finally:
            set_module(self.model, name, original)
