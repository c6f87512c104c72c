"""torchslim: make trained PyTorch models smaller and faster while keeping their accuracy."""

from ._version import __version__
from .core.config import Config, config_from_dict
from .distillation import Distillation, distill
from .core.errors import CheckpointError, ConfigError, DataError, TorchslimError, UnsupportedModelError
from .export import load, read_manifest
from .export.onnx import export_onnx
from .lowrank import CP, SVD, Tucker, decompose
from .metrics import evaluate
from .pipeline.commands import run_recipe as compress
from .pipeline.recipe import Recipe, load_recipe
from .training.finetune import Finetune, finetune
from .training.train import TrainConfig, train
from .hf.api import profile, prune, save  # route transformers models to torchslim.hf's adapters
from .pruning.config import Schedule, SemiStructuredPruning, StructuredPruning, UnstructuredPruning
from .pruning.variational import VariationalDropout
from .quantization import (
                           QAT,
                           BinaryWeights,
                           DynamicQuantization,
                           Float8,
                           MixedPrecision,
                           StaticQuantization,
                           TernaryWeights,
                           WeightOnly,
                           SoftWeightSharing,
                           WeightSharing,
                           quantize,
)
from . import hf, search, techniques  # search is callable: torchslim.search(recipe, out_dir, SearchOptions(...))
from .search.options import SearchOptions
from .search.scan import sensitivity

__all__ = [
    "__version__", "Config", "config_from_dict",
    "TorchslimError", "ConfigError", "DataError", "CheckpointError", "UnsupportedModelError",
    "save", "load", "read_manifest", "evaluate", "profile", "train", "TrainConfig", "finetune",
    "prune", "Schedule", "UnstructuredPruning", "StructuredPruning", "SemiStructuredPruning", "VariationalDropout",
    "Finetune",
    "quantize", "QAT", "BinaryWeights", "TernaryWeights", "MixedPrecision", "StaticQuantization",
    "DynamicQuantization", "WeightOnly", "Float8", "WeightSharing", "SoftWeightSharing",
    "distill", "Distillation", "decompose", "SVD", "Tucker", "CP", "export_onnx",
    "Recipe", "load_recipe", "compress", "search", "SearchOptions", "sensitivity",
]
