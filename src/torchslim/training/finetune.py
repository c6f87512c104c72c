"""``finetune``: plain fine-tuning as a technique verb (the ``Finetune`` stage of recipes)."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from ..core.history import record
from ..metrics.evaluate import Metric
from ..nn.modules import copy_model
from .losses import LossFn
from .train import TrainConfig, train

__all__ = ["Finetune", "finetune"]


@dataclasses.dataclass(frozen=True)
class Finetune(Config):
    """A plain fine-tuning stage on the training split."""

    train: TrainConfig = TrainConfig()


def finetune(model: nn.Module, config: Finetune, *, data, val_data=None, loss_fn: LossFn | str | None = None,
             metric: Metric | None = None, inplace: bool = False, example_inputs=None) -> nn.Module:
    """Train ``model`` (a copy unless ``inplace``) on ``data`` as ``config.train`` says and return it.

    ``loss_fn`` and ``metric`` (measured on ``val_data`` after each epoch) are those of
    :func:`~torchslim.training.train.train`; the config is recorded in the model's history.
    ``example_inputs`` is accepted so that every verb takes the same keywords; fine-tuning needs none."""
    if not isinstance(config, Finetune):
        raise ConfigError(f"finetune expects a Finetune config, got {type(config).__name__}")
    if not inplace:
        model = copy_model(model)
    train(model, data, config.train, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    return record(model, config)
