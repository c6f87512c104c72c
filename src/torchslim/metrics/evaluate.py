from __future__ import annotations

import torch
from torch import nn

from ..data import check_loader
from ..core.errors import TorchslimError


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str | torch.device | None = None) -> float:
    """Top-1 accuracy (0-1) of ``model`` on ``loader``; the model's train/eval mode is restored."""
    check_loader(loader, "evaluation loader")
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for x, y in loader:
            out = model(x.to(device))
            if not torch.isfinite(out).all():
                raise TorchslimError("model produced NaN/inf outputs during evaluation; check for NaN weights "
                                     "(torchslim.metrics.profile reports them) or a diverged fine-tuning run")
            correct += (out.argmax(1).cpu() == y).sum().item()
            total += y.numel()
    finally:
        model.train(was_training)
    return correct / total
