"""One search problem: the baseline, the data, the recipe's stages and their knobs; evaluating one setting."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from ..export import saved_size
from ..metrics.profile import compare_latency, count_macs, measure_latency
from ..metrics.significance import Judge
from ..nn.inference import for_inference
from ..pipeline.recipe import OBJECTIVES, Recipe, StageSpec, reseed
from ..pipeline.runner import StageInputs, run_stages
from .knobs import Knob, build_knobs, stage_configs

__all__ = ["Problem", "Evaluation", "latency_ratio"]

LatencyFn = Callable[[nn.Module, nn.Module, tuple], float]


def latency_ratio(baseline: nn.Module, model: nn.Module, example_inputs: tuple) -> float:
    """``model``'s latency over ``baseline``'s, both in their inference form, measured side by side."""
    lat = compare_latency({"baseline": for_inference(baseline), "model": for_inference(model)}, example_inputs)
    return lat["model"] / lat["baseline"]


@dataclasses.dataclass
class Evaluation:
    """One setting run through the whole recipe: validation metric, objective and per-stage records."""

    values: dict[str, float]
    metric: float
    objective: float
    stages: list[dict[str, Any]]
    model: nn.Module | None = None
    latency_ratio: float | None = None
    paired: dict[str, Any] | None = None


class Problem:
    """Everything a trial needs: the baseline (never modified; the teacher of distillation stages), the data, the
    stages, the knobs, the metric (``metric_fn(model, loader)``), what training stages minimise and validate with
    (``loss_fn`` and ``stage_metric``; None: cross-entropy and top-1 accuracy) and the objective. ``evaluate`` is deterministic for given values: the RNG and
    the training loader's shuffling are reset before each run. With ``max_latency_ratio``, each evaluation also
    measures ``latency_fn(baseline, model, example_inputs)`` (default :func:`latency_ratio`) and
    :meth:`feasible` requires it to be at most that ratio."""

    def __init__(self, recipe: Recipe, baseline: nn.Module, data, *, objective: str, metric_fn: Callable,
                 save_kw: dict | None = None, latency_repeats: int = 30, loss_fn=None,
                 stage_metric: Callable | None = None, judge: Judge | None = None,
                 max_latency_ratio: float | None = None, latency_fn: LatencyFn | None = None):
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.recipe = recipe
        self.baseline = baseline.cpu().eval()
        self.data = data
        self.objective = objective
        self.metric_fn = metric_fn
        self.save_kw = dict(save_kw or {})
        self.latency_repeats = latency_repeats
        self.judge = judge
        self.max_latency_ratio = max_latency_ratio
        self.latency_fn = latency_fn or latency_ratio
        self.example_inputs = data.example_inputs(recipe.example_batch)
        self.inputs = StageInputs(data=data, example_inputs=self.example_inputs, teacher=self.baseline,
                                  loss_fn=loss_fn, metric=stage_metric)
        self.stages: tuple[StageSpec, ...] = recipe.stages
        self.knobs: list[Knob] = build_knobs(self.stages, self.baseline, self.example_inputs)

    def objective_value(self, model: nn.Module) -> float:
        """The objective of ``model``: bytes of its checkpoint, counted MACs or measured latency."""
        if self.objective == "size":
            return float(saved_size(model, **self.save_kw))
        if self.objective == "macs":
            return float(count_macs(model, self.example_inputs))
        return float(measure_latency(model, self.example_inputs, repeats=self.latency_repeats))

    def certified(self, ev: Evaluation) -> float:
        """What the budget decision compares with the floor: the baseline minus the upper confidence bound of the
        drop (the plain validation metric without a judge)."""
        return ev.metric if ev.paired is None or self.judge is None else self.judge.assess(ev.paired)["certified"]

    def configs(self, values: dict[str, float]) -> list[Config | None]:
        """Each stage's config for knob ``values`` (None: the stage does nothing)."""
        return stage_configs(self.stages, self.knobs, values)

    def evaluate(self, values: dict[str, float], *, keep_model: bool = False,
                 describe: Callable[[nn.Module], dict[str, Any]] | None = None) -> Evaluation:
        """Run the recipe with knob ``values`` on the baseline (left untouched) and measure it on the validation
        split after each stage; ``describe(model)`` adds fields to each stage's record."""
        # Results must depend on the setting only (not on what ran before in this process): resumed and
        # parallel searches compare trials measured in different processes.
        reseed(self.data, self.recipe.seed)

        def measure(model: nn.Module) -> dict[str, Any]:
            rec = {"val_accuracy": float(self.metric_fn(model, self.data.val)),
                   "size_bytes": saved_size(model, **self.save_kw)}
            return {**rec, **describe(model)} if describe is not None else rec

        stages = [(stage.name, config) for stage, config in zip(self.stages, self.configs(values))]
        model, records = run_stages(self.baseline, stages, self.inputs, measure=measure)
        model = model.cpu()
        objective = float(records[-1]["size_bytes"]) if self.objective == "size" else self.objective_value(model)
        ratio = (float(self.latency_fn(self.baseline, model, self.example_inputs))
                 if self.max_latency_ratio is not None else None)
        # What the budget decision needs: the samples (or batches) on which the setting and the baseline differ.
        paired = self.judge.paired(model) if self.judge is not None else None
        return Evaluation(values=dict(values), metric=records[-1]["val_accuracy"], objective=objective,
                          stages=records, model=model if keep_model else None, latency_ratio=ratio, paired=paired)

    def too_slow(self, ratio: float | None) -> bool:
        """Whether a measured latency ratio breaks the ceiling (never without one)."""
        return self.max_latency_ratio is not None and ratio is not None and ratio > self.max_latency_ratio
