"""The one stage loop: apply technique configs in order through their descriptors, measuring after each.

``torchslim compress`` (through the guard), the guard's retries and every search trial run stages with
:func:`run_stages`; what a stage may use travels in one :class:`StageInputs`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable

from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from ..core.technique import Techniques
from ..data import Splits
from ..nn.modules import copy_model
from ..techniques import BUILTIN
from ..training.finetune import Finetune, finetune

__all__ = ["StageInputs", "apply_stage", "run_stages", "Finetune", "finetune"]


@dataclasses.dataclass(frozen=True)
class StageInputs:
    """What a stage may use: the data splits (``train`` trains and calibrates, ``val`` validates), example
    inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs), the teacher of distillation
    stages (the uncompressed original), the user's loss and metric (None: cross-entropy and top-1 accuracy)
    and the technique registry configs are looked up in."""

    data: Splits
    example_inputs: Any
    teacher: nn.Module | None = None
    loss_fn: Any = None
    metric: Callable[[nn.Module, Any], float] | None = None
    techniques: Techniques = BUILTIN


def apply_stage(model: nn.Module, config: Config, inputs: StageInputs) -> nn.Module:
    """Return a new model: ``model`` with ``config`` applied by its technique (``model`` is left untouched)."""
    technique = inputs.techniques.of(config)
    kwargs: dict[str, Any] = dict(data=inputs.data.train, val_data=inputs.data.val,
                                  example_inputs=inputs.example_inputs, loss_fn=inputs.loss_fn, metric=inputs.metric)
    if technique.needs_teacher:
        if inputs.teacher is None:
            raise ConfigError(f"a {technique.name} stage needs a teacher: run it in a pipeline (the uncompressed "
                              "original is the teacher) or call its function with teacher= directly")
        kwargs["teacher"] = inputs.teacher
    return technique.apply(model, config, **kwargs)


def run_stages(model: nn.Module, stages: Iterable[tuple[str, Config | None]], inputs: StageInputs, *,
               measure: Callable[[nn.Module], dict[str, Any]], keep_models: bool = False,
               log: Callable[[str], None] | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Apply each ``(name, config)`` in order (a None config leaves the model as it is) and ``measure`` the result.

    Each record holds the stage name, its config dict (None when skipped), the seconds it took and what
    ``measure(model)`` returned, plus the model after it under ``"model"`` when ``keep_models``. ``model`` itself
    is never modified."""
    records = []
    current = model
    for name, config in stages:
        t0 = time.perf_counter()
        if config is not None:
            if log:
                log(f"stage {name}: {type(config).__name__}")
            current = apply_stage(current, config, inputs)
        seconds = time.perf_counter() - t0
        record: dict[str, Any] = {"name": name, "config": None if config is None else config.to_dict(),
                                  "seconds": seconds, **measure(current)}
        if log and config is not None and "val_accuracy" in record:
            log(f"  val {record['val_accuracy']:.4f}  ({seconds:.1f} s)")
        if keep_models:
            record["model"] = current
        records.append(record)
    if current is model:  # every stage skipped: still hand back a model the caller may change
        current = copy_model(model)
    return current, records
