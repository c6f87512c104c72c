"""Training: TrainConfig, the loop (any batch, any loss) and data-parallel runs under torchrun."""

from .finetune import Finetune, finetune
from .losses import TASKS, resolve_loss
from .train import History, TrainConfig, default_device, train

__all__ = ["TrainConfig", "History", "train", "default_device", "Finetune", "finetune", "TASKS", "resolve_loss"]
