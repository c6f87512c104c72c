"""Training: TrainConfig, the loop (any batch, any loss) and data-parallel runs under torchrun."""

from .train import History, TrainConfig, default_device, train

__all__ = ["TrainConfig", "History", "train", "default_device"]
