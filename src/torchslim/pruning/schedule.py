"""When to prune: one-shot, iterative (prune -> fine-tune, repeated) and gradual (Zhu & Gupta 2017)."""

from __future__ import annotations

from torch import nn

from ..data import check_loader
from ..core.errors import ConfigError
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from ..training.train import train
from .config import Schedule, SemiStructuredPruning, StructuredPruning, UnstructuredPruning
from .importance import bn_l1_penalty
from .nm import semi_structured_prune
from .structured import structured_prune
from .unstructured import (
    apply_masks,
    magnitude_masks,
    prunable_layers,
    unstructured_prune,
)

# Share of a gradual run during which sparsity ramps up; the rest recovers at the final sparsity.
RAMP_SHARE = 0.5


def cubic(progress: float) -> float:
    """Share of the final sparsity reached at ``progress`` in [0, 1]: 1 - (1 - progress)^3."""
    return 1.0 - (1.0 - min(max(progress, 0.0), 1.0)) ** 3


def step_targets(schedule: Schedule) -> list[float]:
    """Cumulative share of the final rate after each pruning step."""
    n = schedule.steps if schedule.kind != "oneshot" else 1
    if schedule.kind == "gradual":
        return [cubic((k + 1) / n) for k in range(n)]
    return [(k + 1) / n for k in range(n)]


def _scale(rate, share: float):
    if isinstance(rate, dict):
        return {k: v * share for k, v in rate.items()}
    return rate * share


def _relative(target, done):
    """Ratio of the *remaining* channels to remove so that ``done`` becomes ``target`` overall."""
    if isinstance(target, dict):
        return {k: (target[k] - done[k]) / (1.0 - done[k]) for k in target}
    return (target - done) / (1.0 - done)


def _require_data(config, data) -> None:
    if config.schedule.finetune is not None or getattr(config, "bn_penalty", 0) > 0:
        check_loader(data, f"data (needed to fine-tune in the {config.schedule.kind} schedule)")


def run_unstructured(model: nn.Module, config: UnstructuredPruning, data=None, val_data=None, *,
                     loss_fn: LossFn | str | None = None, metric: Metric | None = None) -> dict:
    """Apply ``config`` to ``model`` in place following its schedule; returns per-layer sparsity.
    Fine-tuning trains on ``data`` with ``loss_fn`` and measures ``metric`` on ``val_data``."""
    sched = config.schedule
    _require_data(config, data)
    if sched.kind == "gradual":
        return _gradual_unstructured(model, config, data, val_data, loss_fn, metric)
    summary: dict = {}
    for share in step_targets(sched):
        summary = unstructured_prune(model, config, _scale(config.sparsity, share), data=data, loss_fn=loss_fn)
        if sched.finetune is not None:
            train(model, data, sched.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    return summary


def run_semi_structured(model: nn.Module, config: SemiStructuredPruning, data=None, val_data=None, *,
                        loss_fn: LossFn | str | None = None, metric: Metric | None = None) -> dict:
    """Apply the N:M masks of ``config`` to ``model`` in place, then fine-tune with the masks fixed when the
    schedule says so; returns per-layer sparsity."""
    _require_data(config, data)
    summary = semi_structured_prune(model, config, data=data, loss_fn=loss_fn)
    if config.schedule.finetune is not None:
        train(model, data, config.schedule.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    return summary


def _gradual_unstructured(model: nn.Module, config: UnstructuredPruning, data, val_data, loss_fn, metric) -> dict:
    """One fine-tuning run; masks follow the cubic ramp, updated ``steps`` times in the first
    ``RAMP_SHARE`` (half) of it so the rest recovers at the final sparsity."""
    sched = config.schedule
    layers = prunable_layers(model, config.exclude)
    targets = step_targets(sched)
    state = {"next": 0}

    def on_step(step: int, total: int) -> None:
        ramp_end = max(1, int(RAMP_SHARE * total))
        while state["next"] < len(targets) and step >= state["next"] * ramp_end // len(targets):
            share = targets[state["next"]]
            apply_masks(layers, magnitude_masks(layers, _scale(config.sparsity, share), config.scope))
            state["next"] += 1

    train(model, data, sched.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric, on_step=on_step)
    # Short runs may end before the last update; the result must still meet the target.
    return unstructured_prune(model, config)


def run_structured(model: nn.Module, config: StructuredPruning, example_inputs, data=None, val_data=None, *,
                   loss_fn: LossFn | str | None = None, metric: Metric | None = None) -> dict:
    """Apply ``config`` to ``model`` in place following its schedule; returns the last step's summary
    with ``removed_channels`` spanning the whole schedule. ``loss_fn`` drives fine-tuning and Taylor
    importance, ``metric`` is measured on ``val_data`` after each fine-tuning epoch."""
    sched = config.schedule
    _require_data(config, data)
    if config.importance == "taylor":
        check_loader(data, "data (needed for taylor importance)")
    if config.bn_penalty > 0:
        if sched.finetune is None:
            raise ConfigError("bn_penalty > 0 trains with an L1 penalty on BN scales before pruning: set "
                              "schedule.finetune to a TrainConfig")
        train(model, data, sched.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric,
              penalty=bn_l1_penalty(model, config.bn_penalty))
    done = _scale(config.ratio, 0.0)
    first: dict[str, list[int]] = {}
    summary: dict = {}
    for share in step_targets(sched):
        target = _scale(config.ratio, share)
        summary = structured_prune(model, config, example_inputs, data=data, loss_fn=loss_fn,
                                   ratio=_relative(target, done))
        for layer, (before, _after) in summary.get("removed_channels", {}).items():
            first.setdefault(layer, before)
        done = target
        if sched.finetune is not None:
            train(model, data, sched.finetune, val_loader=val_data, loss_fn=loss_fn, metric=metric)
    summary["removed_channels"] = {k: [first.get(k, v[0]), v[1]] for k, v in
                                   summary.get("removed_channels", {}).items()}
    return summary
