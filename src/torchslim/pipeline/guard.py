"""Guard rails: measure after every stage, retry a stage that breaks the budget with a milder setting, or roll it
back, and record what happened so that the report can say so.

Stages are grouped into segments that end at a checked stage (``StageSpec.check``, the last stage is always
checked): an unchecked stage such as one-shot pruning is judged together with the fine-tuning that follows it,
and a retry re-runs the whole segment with every softenable stage in it made milder.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

from torch import nn

from ..core.config import Config
from ..core.errors import TorchslimError
from ..techniques import BUILTIN
from .recipe import GuardSpec, StageSpec
from .runner import apply_stage

__all__ = ["BudgetError", "GuardResult", "run_guarded", "segments"]


class BudgetError(TorchslimError):
    """A result misses the accuracy budget and the policy says to stop (``policy: fail``)."""


@dataclasses.dataclass
class GuardResult:
    """The model after the guarded pipeline, one record per stage, the guard's events, the final validation
    metric and whether it meets the budget (None without a budget)."""

    model: nn.Module
    records: list[dict[str, Any]]
    events: list[dict[str, Any]]
    final_val: float
    met: bool | None


def segments(stages: Sequence[StageSpec]) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges, each ending just after a checked stage (or the last stage)."""
    out, start = [], 0
    for i, stage in enumerate(stages):
        if stage.check or i == len(stages) - 1:
            out.append((start, i + 1))
            start = i + 1
    return out


def run_guarded(model: nn.Module, stages: Sequence[StageSpec], data, example_inputs: tuple, *,
                metric_fn: Callable[[nn.Module, Any], float], baseline_val: float, max_drop: float | None,
                guard: GuardSpec = GuardSpec(), apply: Callable | None = None,
                describe: Callable[[nn.Module], dict[str, Any]] | None = None,
                log: Callable[[str], None] = print) -> GuardResult:
    """Apply ``stages`` to ``model`` (left untouched) measuring ``metric_fn`` on ``data.val`` after each.

    With ``max_drop`` set, a segment whose result scores below ``baseline_val - max_drop`` is handled as
    ``guard.policy`` says. ``describe(model)`` adds report fields (test accuracy, bytes on disk) to each record.
    ``apply(model, config, data, example_inputs, teacher=...)`` applies one stage (default
    :func:`~torchslim.pipeline.runner.apply_stage`); ``model``, the uncompressed original, is the teacher of
    distillation stages.
    """

    apply = apply or apply_stage
    floor = None if max_drop is None else baseline_val - max_drop
    records: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    current, current_val = model, baseline_val
    for start, end in segments(stages):
        seg = list(stages[start:end])
        configs: list[Config] = [s.config for s in seg]
        attempts: list[dict[str, Any]] = []
        factor = 1.0
        while True:
            out, recs = _run_segment(current, seg, configs, data, example_inputs, metric_fn, apply, log, model)
            val = recs[-1]["val_accuracy"]
            attempts.append({"configs": [c.to_dict() for c in configs], "val_accuracy": val})
            if floor is None or val >= floor:
                action = "ok" if len(attempts) == 1 else "retried"
                break
            names = ", ".join(s.name for s in seg)
            log(f"  guard: {names} scores {val:.4f} on val, below the budget floor {floor:.4f}")
            if guard.policy == "fail":
                raise BudgetError(f"stage(s) {names} score {val:.4f} on the validation split, below baseline "
                                  f"{baseline_val:.4f} - max_accuracy_drop {max_drop} (policy 'fail'); lower the "
                                  "stage's rates, add fine-tuning, or use guard.policy retry/rollback")
            if guard.policy == "warn":
                action = "violated"
                break
            milder = None
            if guard.policy == "retry" and len(attempts) <= guard.retries:
                factor *= guard.milder
                softened = [BUILTIN.soften(s.config, factor) for s in seg]
                if any(c is not None for c in softened):
                    milder = [c if c is not None else s.config for c, s in zip(softened, seg)]
            if milder is None:
                action = "rolled_back"
                break
            log(f"  guard: retrying {names} with rates x{factor:g}")
            configs = milder
        if action == "rolled_back":
            log(f"  guard: rolled back {', '.join(s.name for s in seg)} (kept the model from before)")
            recs = [{"name": s.name, "config": s.config.to_dict(), "val_accuracy": current_val, "seconds": 0.0,
                     "_model": current} for s in seg]
            out = current
        else:
            current_val = recs[-1]["val_accuracy"]
        for r in recs:
            r["guard"] = action
            stage_model = r.pop("_model")
            if describe is not None:
                r.update(describe(stage_model))
        if action != "ok":
            events.append({"stages": [s.name for s in seg], "action": action, "floor": floor,
                           "attempts": attempts})
        current = out
        records.extend(recs)
    met = None if floor is None else current_val >= floor
    return GuardResult(model=current, records=records, events=events, final_val=current_val, met=met)


def _run_segment(model: nn.Module, seg: list[StageSpec], configs: list[Config], data, example_inputs: tuple,
                 metric_fn: Callable, apply: Callable, log: Callable[[str], None], teacher: nn.Module
                 ) -> tuple[nn.Module, list[dict[str, Any]]]:
    records = []
    for stage, config in zip(seg, configs):
        log(f"stage {stage.name}: {type(config).__name__}")
        t0 = time.perf_counter()
        model = apply(model, config, data, example_inputs, teacher=teacher)
        seconds = time.perf_counter() - t0
        val = float(metric_fn(model, data.val))
        log(f"  val {val:.4f}  ({seconds:.1f} s)")
        records.append({"name": stage.name, "config": config.to_dict(), "val_accuracy": val, "seconds": seconds,
                        "_model": model})
    return model, records
