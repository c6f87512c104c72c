from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..data import check_loader
from ..data.batches import call_model, output_tensor, split_batch, to_device
from ..core.errors import ConfigError, DataError, TorchslimError

Metric = Callable[[nn.Module, Any], float]
"""``metric(model, loader) -> float``, higher is better."""


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy (0-1) of ``model`` on ``loader``'s labelled batches (any batch form of
    :mod:`torchslim.data.batches`); the model's train/eval mode is restored."""
    check_loader(loader, "evaluation loader")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in loader:
            inputs, y = split_batch(batch)
            if y is None:
                raise DataError("top-1 accuracy needs labelled batches ((inputs, target) or dicts with 'labels'); "
                                "pass metric=(a function (model, loader) -> float) for unlabelled data")
            out = output_tensor(call_model(model, to_device(inputs, device)))
            if not torch.isfinite(out).all():
                raise TorchslimError("model produced NaN/inf outputs during evaluation; check for NaN weights "
                                     "(torchslim.metrics.profile reports them) or a diverged fine-tuning run")
            correct += (out.argmax(1).cpu() == y).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    return correct / total


def resolve_metric(metric: Metric | str | None) -> Metric:
    """``metric`` as a function ``(model, loader) -> float``: None or ``"accuracy"`` is :func:`evaluate`."""
    if metric is None or metric == "accuracy":
        return evaluate
    if not callable(metric):
        raise ConfigError(f"metric must be a function (model, loader) -> float (higher is better) or 'accuracy', "
                          f"got {metric!r}")
    return metric
