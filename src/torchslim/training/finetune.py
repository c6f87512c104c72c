"""The plain fine-tuning stage."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..core.config import Config
from ..nn.modules import copy_model
from .train import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class Finetune(Config):
    """A plain fine-tuning stage on the training split."""

    train: TrainConfig = TrainConfig()


def finetune(model: nn.Module, config: Finetune, *, data=None, val_data=None, inplace: bool = False) -> nn.Module:
    """Fine-tune ``model`` (a copy unless ``inplace``) on ``data`` as ``config.train`` says."""
    if not inplace:
        model = copy_model(model)
    train(model, data, config.train, val_loader=val_data)
    return model
