"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy."""

from ._version import __version__
from .config import Config, config_from_dict
from .errors import CheckpointError, ConfigError, DataError, TorchslimError, UnsupportedModelError
from .export.checkpoint import load, read_manifest, save
from .metrics import evaluate, profile
from .pipeline.train import TrainConfig, train
from .pipeline.runner import Finetune
from .pruning import prune
from .pruning.config import Schedule, StructuredPruning, UnstructuredPruning

__all__ = [
    "__version__", "Config", "config_from_dict",
    "TorchslimError", "ConfigError", "DataError", "CheckpointError", "UnsupportedModelError",
    "save", "load", "read_manifest", "evaluate", "profile", "train", "TrainConfig",
    "prune", "Schedule", "UnstructuredPruning", "StructuredPruning", "Finetune",
]
