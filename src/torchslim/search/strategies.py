"""The two strategies, both storing every evaluation as a trial of one Optuna study (so a stopped search resumes
without repeating finished trials, and several processes or machines can work on one study):

- ``fast``: bisection along the Lagrangian path of the one-shot scan (:mod:`.allocation`), with the full
  recipe (fine-tuning included) at each step.
- ``optuna``: multi-objective TPE (maximise the metric, minimise the objective, the budget as a constraint),
  warm-started with a few settings of the same path; the report shows the Pareto front.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ..core.errors import ConfigError, UnsupportedModelError
from .allocation import bisect_path, bisection_steps, lagrangian_path, spread
from .knobs import Knob
from .pareto import OBJECTIVE_LABELS
from .problem import Evaluation, Problem
from .storage import complete, owner_attrs, params_key

__all__ = ["fast", "optimize", "warm_start", "quiet_optuna"]


def quiet_optuna(fn: Callable) -> Callable:
    """Run ``fn`` with Optuna's per-trial INFO lines silenced (the search logs its own progress), then restore
    Optuna's verbosity."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import optuna

        before = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return fn(*args, **kwargs)
        finally:
            optuna.logging.set_verbosity(before)
    return wrapper


def _distributions(knobs: Sequence[Knob]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {k.name: (CategoricalDistribution(list(k.choices)) if k.choices is not None
                     else FloatDistribution(k.low, k.high)) for k in knobs}


def _attrs(ev: Evaluation, worker: int) -> dict[str, Any]:
    # The thread count is stored so that the chosen trial's re-run uses the same (results depend on it); the
    # paired record so that the budget decision can be re-judged at another confidence.
    out = {"stages": ev.stages, "worker": worker, "threads": torch.get_num_threads(), "paired": ev.paired}
    if ev.latency_ratio is not None:
        out["latency_ratio"] = ev.latency_ratio
    return out


def _verdict(problem: Problem, ev: Evaluation, floor: float) -> str:
    certified = problem.certified(ev)
    bound = f", certified {certified:.4f}" if ev.paired is not None else ""
    return f"val {ev.metric:.4f}{bound} ({'meets' if certified >= floor - 1e-12 else 'misses'} {floor:.4f})"


def fast(problem: Problem, study, floor: float, sens: dict[str, Any], log: Callable[[str], None],
         progress: bool, stop_after: int | None = None) -> int:
    """Bisection along the Lagrangian path, each setting judged by its certified value (baseline minus the upper
    confidence bound of its drop); evaluations already in the study are reused. Returns the number of new
    evaluations (``stop_after`` stops early, as an interruption would)."""

    def stored_certified(t) -> float:
        paired = t.user_attrs.get("paired")
        return t.values[0] if paired is None or problem.judge is None else problem.judge.assess(paired)["certified"]

    import optuna

    path = lagrangian_path(problem.knobs, sens)
    done = {params_key(t.params): t for t in complete(study)}
    dists = _distributions(problem.knobs)
    state = {"new": 0}
    label = OBJECTIVE_LABELS[problem.objective]
    log(f"fast search: {len(path)} settings from most to least aggressive; bisection needs about "
        f"{bisection_steps(len(path))} evaluations")
    bar = tqdm(desc="search (fast)", disable=None if progress else True, leave=False, dynamic_ncols=True)

    def metric_at(i: int) -> float:
        values = path[i]
        key = params_key(values)
        if key in done:
            t = done[key]
            certified = stored_certified(t)
            log(f"  setting {i + 1}/{len(path)}: trial {t.number} (stored) val {t.values[0]:.4f}, certified "
                f"{certified:.4f}, {label} {t.values[1]:,.0f}")
            # Too slow counts as missing the budget: the bisection moves to milder settings.
            return float("-inf") if problem.too_slow(t.user_attrs.get("latency_ratio")) else certified
        if stop_after is not None and state["new"] >= stop_after:
            raise KeyboardInterrupt("stopped (stop_after)")
        ev = problem.evaluate(values)
        certified = problem.certified(ev)
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, values=[ev.metric, ev.objective],
                                                  user_attrs=_attrs(ev, 0), constraints={"budget": floor - certified}))
        state["new"] += 1
        bar.update(1)
        done[key] = next(t for t in reversed(complete(study)) if params_key(t.params) == key)
        slow = problem.too_slow(ev.latency_ratio)
        log(f"  setting {i + 1}/{len(path)}: {_verdict(problem, ev, floor)}, {label} {ev.objective:,.0f}"
            + (f", latency {ev.latency_ratio:.3f}x the baseline's" if ev.latency_ratio is not None else "")
            + (f" (over the {problem.max_latency_ratio}x ceiling)" if slow else ""))
        return float("-inf") if slow else certified

    try:
        bisect_path(len(path), metric_at, floor)
    finally:
        bar.close()
    return state["new"]


def warm_start(study, knobs: Sequence[Knob], sens: dict[str, Any], trials: int) -> None:
    """Queue a few settings of the Lagrangian path as the first trials of a new study."""
    if study.trials:
        return
    for values in spread(lagrangian_path(knobs, sens), trials):
        study.enqueue_trial(values, skip_if_exists=True)


def optimize(problem: Problem, study, total: int, worker: int, floor: float, progress: bool,
             log: Callable[[str], None] | None = None) -> None:
    """Run trials until the study holds ``total`` complete ones (counting every worker's); with ``log``, one line
    per finished trial with the best setting meeting the budget so far."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    knobs = problem.knobs
    label = OBJECTIVE_LABELS[problem.objective]
    best: dict[str, Any] = {}

    def objective(trial) -> tuple[float, float]:
        # Who runs the trial, so that a resumed search can fail it if this process is killed.
        for key, value in owner_attrs().items():
            trial.set_user_attr(key, value)
        values = {}
        for k in knobs:
            values[k.name] = (trial.suggest_categorical(k.name, list(k.choices)) if k.choices is not None
                              else trial.suggest_float(k.name, k.low, k.high))
        ev = problem.evaluate(values)
        for key, value in _attrs(ev, worker).items():
            trial.set_user_attr(key, value)
        certified = problem.certified(ev)
        trial.set_constraint("budget", floor - certified)
        if log is not None:
            if certified >= floor - 1e-12 and ev.objective < best.get("objective", float("inf")):
                best.update(objective=ev.objective, trial=trial.number)
            so_far = (f"best meeting the budget: trial {best['trial']}, {label} {best['objective']:,.0f}" if best
                      else "none meets the budget yet")
            log(f"  trial {trial.number} ({len(complete(study)) + 1}/{total}): {_verdict(problem, ev, floor)}, "
                f"{label} {ev.objective:,.0f}; {so_far}")
        return ev.metric, ev.objective

    done = len(complete(study))
    if done >= total:
        return
    # One bar (worker 0's) counting the finished trials of every worker.
    bar = tqdm(total=total, initial=done, desc="search (optuna)", disable=None if progress and worker == 0 else True,
               leave=False, dynamic_ncols=True)

    def show(study, trial) -> None:
        bar.n = len(complete(study))
        bar.refresh()

    try:
        study.optimize(objective, n_trials=total - done, catch=(ConfigError, UnsupportedModelError),
                       callbacks=[MaxTrialsCallback(total, states=(TrialState.COMPLETE,)), show])
    finally:
        bar.close()
