"""Guard rails: measure after every stage, retry a stage that breaks the budget with a milder setting, or roll it
back, and record what happened so that the report can say so.

Stages are grouped into segments that end at a checked stage (``StageSpec.check``, the last stage is always
checked): an unchecked stage such as one-shot pruning is judged together with the fine-tuning that follows it,
and a retry re-runs the whole segment with every softenable stage in it made milder.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from torch import nn

from ..core.config import Config
from ..core.errors import TorchslimError
from ..metrics.significance import Judge
from .recipe import GuardSpec, StageSpec
from .runner import StageInputs, run_stages

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
    judged: dict[str, Any] | None = None


def segments(stages: Sequence[StageSpec]) -> list[tuple[int, int]]:
    """``[start, end)`` index ranges, each ending just after a checked stage (or the last stage)."""
    out, start = [], 0
    for i, stage in enumerate(stages):
        if stage.check or i == len(stages) - 1:
            out.append((start, i + 1))
            start = i + 1
    return out


def run_guarded(model: nn.Module, stages: Sequence[StageSpec], inputs: StageInputs, *,
                metric_fn: Callable[[nn.Module, Any], float], baseline_val: float, max_drop: float | None,
                guard: GuardSpec = GuardSpec(), describe: Callable[[nn.Module], dict[str, Any]] | None = None,
                log: Callable[[str], None] = print, judge: Judge | None = None) -> GuardResult:
    """Apply ``stages`` to ``model`` (left untouched) measuring ``metric_fn`` on the validation split after each.

    With ``max_drop`` set, a segment whose result scores below ``baseline_val - max_drop`` is handled as
    ``guard.policy`` says. ``describe(model)`` adds report fields (test accuracy, bytes on disk) to each record
    of an accepted segment. ``inputs.teacher`` (normally ``model``) is the teacher of distillation stages.
    With a ``judge`` (:class:`~torchslim.metrics.significance.Judge` of the baseline on the validation split),
    a segment is within budget when the upper confidence bound of its drop is, not merely its point estimate.
    """
    floor = None if max_drop is None else baseline_val - max_drop
    records: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    current, current_val = model, baseline_val
    current_judged = None

    def measure(m: nn.Module) -> dict[str, Any]:
        return {"val_accuracy": float(metric_fn(m, inputs.data.val))}

    for start, end in segments(stages):
        seg = list(stages[start:end])
        configs: list[Config] = [s.config for s in seg]
        attempts: list[dict[str, Any]] = []
        factor = 1.0
        while True:
            out, recs = run_stages(current, [(s.name, c) for s, c in zip(seg, configs)], inputs, measure=measure,
                                   keep_models=True, log=log)
            val = recs[-1]["val_accuracy"]
            attempts.append({"configs": [c.to_dict() for c in configs], "val_accuracy": val})
            judged = judge.assess(judge.paired(out)) if judge is not None and floor is not None else None
            if judged is not None:
                attempts[-1]["drop_bound"] = judged["drop_bound"]
            if floor is None or (judged["met"] if judged is not None else val >= floor):
                action = "ok" if len(attempts) == 1 else "retried"
                break
            names = ", ".join(s.name for s in seg)
            if judged is not None and judged["drop_bound"] is not None and val >= floor:
                log(f"  guard: {names} scores {val:.4f} on val, but the {100 * judge.confidence:.0f}% upper bound of "
                    f"its drop on {judged['n']:,} samples is {100 * judged['drop_bound']:.2f} points, over the "
                    f"budget {100 * max_drop:.2f}")
            else:
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
                softened = [inputs.techniques.soften(s.config, factor) for s in seg]
                if any(c is not None for c in softened):
                    milder = [c if c is not None else s.config for c, s in zip(softened, seg)]
            if milder is None:
                action = "rolled_back"
                break
            log(f"  guard: retrying {names} with rates x{factor:g}")
            configs = milder
        if action == "rolled_back":
            log(f"  guard: rolled back {', '.join(s.name for s in seg)} (kept the model from before)")
            recs = [{"name": s.name, "config": s.config.to_dict(), "seconds": 0.0, "val_accuracy": current_val,
                     "model": current} for s in seg]
            out = current
        else:
            current_val, current_judged = recs[-1]["val_accuracy"], judged
        for r in recs:
            r["guard"] = action
            stage_model = r.pop("model")
            if describe is not None:
                r.update(describe(stage_model))
        if action != "ok":
            events.append({"stages": [s.name for s in seg], "action": action, "floor": floor,
                           "attempts": attempts})
        current = out
        records.extend(recs)
    if floor is None:
        met = None
    elif judge is not None:
        # Everything rolled back: the baseline itself, which is within any budget.
        met = True if current_judged is None else current_judged["met"]
    else:
        met = current_val >= floor
    return GuardResult(model=current, records=records, events=events, final_val=current_val, met=met,
                       judged=current_judged)
