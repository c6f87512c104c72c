"""Apply a list of technique configs (stages) to a model, measuring after each."""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from torch import nn

from ..core.config import Config
from ..data import Splits
from ..core.errors import ConfigError
from ..export import saved_size
from ..metrics import evaluate
from ..nn.modules import copy_model
from ..training.train import TrainConfig, train


@dataclasses.dataclass(frozen=True)
class Finetune(Config):
    """A plain fine-tuning stage on the training split."""

    train: TrainConfig = TrainConfig()


StageFn = Callable[..., nn.Module]


def _prune_stage(model, config, data: Splits, example_inputs: tuple, teacher) -> nn.Module:
    from ..pruning import prune

    return prune(model, config, example_inputs=example_inputs, data=data.train, val_data=data.val)


def _quantize_stage(model, config, data: Splits, example_inputs: tuple, teacher) -> nn.Module:
    from ..quantization import quantize

    return quantize(model, config, calibration_data=data.train, data=data.train, val_data=data.val,
                    example_inputs=example_inputs)


def _decompose_stage(model, config, data: Splits, example_inputs: tuple, teacher) -> nn.Module:
    from ..lowrank import decompose

    return decompose(model, config, example_inputs=example_inputs, data=data)[0]


def _distill_stage(model, config, data: Splits, example_inputs: tuple, teacher) -> nn.Module:
    from ..distillation import distill

    if teacher is None:
        raise ConfigError("a Distillation stage needs a teacher: run it in a pipeline (the uncompressed "
                          "original is the teacher) or call torchslim.distill(student, teacher, ...) directly")
    return distill(copy_model(model), teacher, data, config)


def _finetune_stage(model, config, data: Splits, example_inputs: tuple, teacher) -> nn.Module:
    model = copy_model(model)
    train(model, data.train, config.train, val_loader=data.val)
    return model


def stage_handlers() -> dict[str, StageFn]:
    """Config type name -> function applying it as a pipeline stage."""
    quantize_types = ("QAT", "BinaryWeights", "TernaryWeights", "MixedPrecision", "StaticQuantization",
                      "DynamicQuantization", "WeightOnly", "Float8", "WeightSharing")
    return {
        "UnstructuredPruning": _prune_stage,
        "StructuredPruning": _prune_stage,
        **{name: _quantize_stage for name in quantize_types},
        "SVD": _decompose_stage,
        "Tucker": _decompose_stage,
        "CP": _decompose_stage,
        "Distillation": _distill_stage,
        "Finetune": _finetune_stage,
    }


def apply_stage(model: nn.Module, config: Config, data: Splits, example_inputs: tuple,
                teacher: nn.Module | None = None) -> nn.Module:
    """Return a new model: ``model`` with one technique ``config`` applied. ``teacher`` (the uncompressed
    original) is what a Distillation stage learns from."""
    handlers = stage_handlers()
    name = type(config).__name__
    if name not in handlers:
        raise ConfigError(f"no pipeline stage for config {name}; stages: {sorted(handlers)}")
    return handlers[name](model, config, data, example_inputs, teacher)


def run_stages(model: nn.Module, stages: list[tuple[str, Config]], data: Splits, example_inputs: tuple,
               log: Callable[[str], None] = print) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Apply ``stages`` in order; each record holds the config, test accuracy, bytes on disk and time."""
    records = []
    original = model
    for name, config in stages:
        log(f"stage {name}: {type(config).__name__}")
        t0 = time.perf_counter()
        model = apply_stage(model, config, data, example_inputs, teacher=original)
        seconds = time.perf_counter() - t0
        acc = evaluate(model, data.test)
        size = saved_size(model)
        records.append({"name": name, "config": config.to_dict(), "accuracy": acc, "size_bytes": size,
                        "seconds": seconds})
        log(f"  accuracy {acc:.4f}  bytes on disk {size:,}  ({seconds:.1f} s)")
    return model, records

