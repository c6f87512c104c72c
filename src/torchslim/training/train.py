"""``train``: the fine-tuning loop shared by every technique that trains (pruning schedules, QAT, distillation),
data-parallel under ``torchrun``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.errors import ConfigError
from ..metrics.evaluate import Metric, model_device
from . import distributed
from .loop import History, TrainConfig, default_device, make_optimizer, train_local
from .losses import LossFn

__all__ = ["TrainConfig", "History", "train", "default_device", "make_optimizer", "model_device"]


def train(model: nn.Module, train_loader, config: TrainConfig = TrainConfig(), *, val_loader=None,
          loss_fn: LossFn | str | None = None, metric: Metric | None = None,
          penalty: Callable[[nn.Module], torch.Tensor] | None = None,
          on_step: Callable[[int, int], None] | None = None, extra_params=(), state_path=None) -> History:
    """Train ``model`` in place and return its loss / validation history.

    Batches may take any form of :mod:`torchslim.data.batches`. ``loss_fn(outputs, batch)`` or a named task
    (``"cross_entropy"``, the default, ``"mse"``, ``"model_loss"``; see :mod:`torchslim.training.losses`);
    ``metric(model, loader)`` is measured on ``val_loader`` after each epoch (default: top-1 accuracy).
    ``penalty(model)`` is added to the loss (e.g. an L1 term on BN scales); ``on_step(step, total_steps)``
    runs before each optimizer step's forward pass (e.g. to update gradual pruning masks);
    ``extra_params`` are trained alongside the model's (e.g. a distillation projection).
    ``state_path`` (one process only): checkpoint each epoch there and resume from it (see ``train_local``).

    Under ``torchrun`` (several processes) training runs data-parallel through
    :func:`~torchslim.training.distributed.train_distributed`, with the same global batch.
    """
    kwargs = dict(val_loader=val_loader, loss_fn=loss_fn, metric=metric, penalty=penalty, on_step=on_step,
                  extra_params=extra_params)
    if distributed.should_wrap(model):
        if state_path is not None:
            raise ConfigError("state_path (resumable training) works in one process only, not under torchrun")
        return distributed.train_distributed(model, train_loader, config, **kwargs)
    return train_local(model, train_loader, config, state_path=state_path, **kwargs)
