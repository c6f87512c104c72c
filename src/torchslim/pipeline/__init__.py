"""Training loop and (later) recipes and the staged compression pipeline."""

from .train import History, TrainConfig, train

__all__ = ["TrainConfig", "History", "train"]
