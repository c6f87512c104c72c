"""Accuracy-constrained search: per-layer rates minimising size, latency or MACs subject to
``metric >= baseline - max_accuracy_drop`` on the validation split (the test split is only for the report).

Two strategies share one Optuna study (every evaluation is a trial in its storage, so a stopped search resumes
without repeating finished trials, and several processes or machines can work on one study):

- ``fast``: a one-shot sensitivity scan of every knob, a Lagrangian allocation (for a multiplier mu, each knob
  takes the grid value maximising ``objective saving - mu * output error``) that orders the settings from most
  to least aggressive, then bisection on that order with the full recipe (fine-tuning included).
- ``optuna``: multi-objective TPE (maximise the metric, minimise the objective, the budget as a constraint),
  warm-started with a few sensitivity-guided settings; returns the Pareto front.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import multiprocessing
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import Config
from ..core.errors import ConfigError, TorchslimError, UnsupportedModelError
from ..export import saved_size
from ..metrics.profile import count_macs, measure_latency
from ..pipeline.recipe import OBJECTIVES, Recipe, StageSpec, load_recipe
from ..nn.modules import copy_model
from ..techniques import BUILTIN
from .pareto import OBJECTIVE_LABELS, choose, pareto_front, plot_pareto
from .sensitivity import (
    Knob,
    build_knobs,
    knob_sensitivity,
    stage_configs,
)

__all__ = ["search", "SearchResult", "Problem", "Evaluation", "open_storage", "lagrangian_path", "StorageError"]

HEARTBEAT_S = 10
GRACE_S = 60
WORKER_WAIT_S = 1800  # how long a --worker waits for its coordinator's baseline and study
_ATTR = "torchslim"


class StorageError(TorchslimError):
    """The Optuna storage URL is malformed, lacks its database driver, or cannot be reached."""


# ----------------------------------------------------------------------------------------------
# Evaluating one setting


@dataclasses.dataclass
class Evaluation:
    """One setting run through the whole recipe: validation metric, objective and per-stage records."""

    values: dict[str, float]
    metric: float
    objective: float
    stages: list[dict[str, Any]]
    model: nn.Module | None = None


class Problem:
    """Everything a trial needs: the baseline (never modified; the teacher of distillation stages), the data, the
    stages, the knobs, the metric and the objective. ``evaluate`` is deterministic for given values: the RNG and
    the training loader's shuffling are reset before each run. ``apply`` defaults to
    :func:`~torchslim.pipeline.runner.apply_stage`."""

    def __init__(self, recipe: Recipe, baseline: nn.Module, data, *, objective: str, metric_fn: Callable,
                 save_kw: dict | None = None, apply: Callable | None = None, latency_repeats: int = 30):
        from ..pipeline.runner import apply_stage

        if objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
        self.recipe = recipe
        self.baseline = baseline.cpu().eval()
        self.data = data
        self.objective = objective
        self.metric_fn = metric_fn
        self.save_kw = dict(save_kw or {})
        self.apply = apply or apply_stage
        self.latency_repeats = latency_repeats
        self.example_inputs = data.example_inputs(recipe.example_batch)
        self.stages: tuple[StageSpec, ...] = recipe.stages
        self.knobs: list[Knob] = build_knobs(self.stages, self.baseline, self.example_inputs)

    def objective_value(self, model: nn.Module) -> float:
        if self.objective == "size":
            return float(saved_size(model, **self.save_kw))
        if self.objective == "macs":
            return float(count_macs(model, self.example_inputs))
        return float(measure_latency(model, self.example_inputs, repeats=self.latency_repeats))

    def _reset_rng(self) -> None:
        from ..pipeline.recipe import reseed

        # Results must depend on the setting only (not on what ran before in this process): resumed and
        # parallel searches compare trials measured in different processes.
        reseed(self.data, self.recipe.seed)

    def configs(self, values: dict[str, float]) -> list[Config | None]:
        return stage_configs(self.stages, self.knobs, values)

    def evaluate(self, values: dict[str, float], *, keep_model: bool = False,
                 describe: Callable[[nn.Module], dict[str, Any]] | None = None) -> Evaluation:
        """Run the recipe with knob ``values`` on a copy of the baseline and measure it on the validation split."""
        self._reset_rng()
        model = copy_model(self.baseline)
        records = []
        for stage, config in zip(self.stages, self.configs(values)):
            t0 = time.perf_counter()
            if config is not None:
                model = self.apply(model, config, self.data, self.example_inputs, teacher=self.baseline)
            rec = {"name": stage.name, "config": None if config is None else config.to_dict(),
                   "val_accuracy": float(self.metric_fn(model, self.data.val)),
                   "size_bytes": saved_size(model, **self.save_kw), "seconds": time.perf_counter() - t0}
            if describe is not None:
                rec.update(describe(model))
            records.append(rec)
        model = model.cpu()
        objective = float(records[-1]["size_bytes"]) if self.objective == "size" else self.objective_value(model)
        return Evaluation(values=dict(values), metric=records[-1]["val_accuracy"], objective=objective,
                          stages=records, model=model if keep_model else None)


# ----------------------------------------------------------------------------------------------
# Allocation


def lagrangian_path(knobs: Sequence[Knob], sens: dict[str, Any]) -> list[dict[str, float]]:
    """Settings ordered from most to least aggressive: for each multiplier mu, every knob takes the scanned value
    maximising ``relative objective saving - mu * output error`` (ties: the milder value). Consecutive
    duplicates are dropped; the last setting leaves every knob mild."""
    base = sens["baseline"]["objective"]
    options: dict[str, list[tuple[float, float, float]]] = {}
    slopes: set[float] = set()
    for k in knobs:
        pts = [(k.mild, 0.0, 0.0)]
        for p in sens["knobs"].get(k.name, []):
            pts.append((p["value"], max(0.0, p["error"]), (base - p["objective"]) / base if base else 0.0))
        options[k.name] = pts
        for i, (_, e1, s1) in enumerate(pts):
            for _, e2, s2 in pts[i + 1:]:
                if (s2 - s1) * (e2 - e1) > 0:
                    slopes.add(abs((s2 - s1) / (e2 - e1)))
    ordered = sorted(slopes)
    mus = [0.0] + [math.sqrt(a * b) if a > 0 else b / 2 for a, b in zip(ordered, ordered[1:])]
    if ordered:
        mus = [0.0] + ([ordered[0] / 2] if ordered[0] > 0 else []) + mus[1:] + [ordered[-1] * 2]
    mus.append(math.inf)

    def pick(mu: float, pts: list[tuple[float, float, float]]) -> float:
        if math.isinf(mu):
            return pts[0][0]
        best = max(pts, key=lambda p: (p[2] - mu * p[1], -p[1]))
        return best[0]

    path: list[dict[str, float]] = []
    for mu in mus:
        alloc = {name: pick(mu, pts) for name, pts in options.items()}
        if not path or alloc != path[-1]:
            path.append(alloc)
    return path


def _fingerprint(model: nn.Module) -> str:
    """sha256 of the model's state (names, shapes and values), to tell baselines apart."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _params_key(values: dict[str, float]) -> str:
    return json.dumps({k: round(float(v), 9) for k, v in sorted(values.items())})


# ----------------------------------------------------------------------------------------------
# Storage


def _redact(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str):
    """An Optuna RDB storage for ``url`` (SQLite file, PostgreSQL, MySQL...), with heartbeats so that trials of a
    killed process are failed and re-queued; raises StorageError naming the problem."""
    import optuna
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception as exc:
        raise StorageError(f"invalid storage URL {url!r} ({exc}); use e.g. sqlite:///search.db or "
                           "postgresql://user:password@host:5432/db") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        db = parsed.database
        if db and db != ":memory:" and not Path(db).parent.is_dir():
            raise StorageError(f"storage {url}: folder {Path(db).parent} does not exist; create it or choose "
                               "another path")
        engine = {"connect_args": {"timeout": 60}}
    else:
        engine = {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    for attempt in range(3):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2))
        except ImportError:
            driver = parsed.get_driver_name()
            raise StorageError(f"storage {_redact(url)} needs the Python driver {driver!r} (SQLAlchemy dialect "
                               f"{backend}+{driver}), which is not installed: pip install it, or name an installed "
                               "driver in the URL (e.g. postgresql+psycopg2://..., mysql+pymysql://...)") from None
        except Exception as exc:
            # Two processes creating the tables of a new database at once: the loser retries and finds them.
            if "already exists" in str(exc) and attempt < 2:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise StorageError(f"cannot reach storage {_redact(url)}: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0]}; check host, port, credentials and that the database "
                               "exists, or use the default SQLite file") from None
    raise AssertionError("unreachable")


def _sampler(seed: int):
    """Multi-objective TPE; trials carry their budget violation through ``set_constraint``."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _study(storage, name: str, sampler=None, create: bool = True):
    import optuna

    try:
        if create:
            return optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"],
                                       load_if_exists=True, sampler=sampler)
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    except KeyError:
        raise StorageError(f"no study {name!r} in the storage; start the coordinating search first "
                           "(torchslim search without --worker)") from None


def _wait_for(ready: Callable[[], Any], what: str, log: Callable[[str], None]) -> Any:
    """Poll ``ready()`` until it returns something truthy: workers may start before their coordinator."""
    deadline = time.monotonic() + WORKER_WAIT_S
    waiting = False
    while not (value := ready()):
        if time.monotonic() > deadline:
            raise StorageError(f"gave up after {WORKER_WAIT_S} s waiting for {what}; start the coordinating search "
                               "(torchslim search without --worker) with the same recipe, --out and --storage")
        if not waiting:
            log(f"waiting for {what}")
            waiting = True
        time.sleep(2)
    return value


def _complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _point(t) -> dict[str, Any]:
    return {"trial": t.number, "metric": t.values[0], "objective": t.values[1], "params": dict(t.params)}


# ----------------------------------------------------------------------------------------------
# Strategies


def _distributions(knobs: Sequence[Knob]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    return {k.name: (CategoricalDistribution(list(k.choices)) if k.choices is not None
                     else FloatDistribution(k.low, k.high)) for k in knobs}


def _record(trial_attrs: dict, ev: Evaluation, worker: int) -> None:
    trial_attrs.update({"stages": ev.stages, "worker": worker, "threads": torch.get_num_threads()})


def _fast(problem: Problem, study, floor: float, sens: dict[str, Any], log: Callable[[str], None],
          progress: bool, stop_after: int | None = None) -> int:
    """Bisection along the Lagrangian path; evaluations already in the study are reused. Returns the number of
    new evaluations (``stop_after`` stops early, to simulate an interrupted run in tests)."""
    import optuna

    path = lagrangian_path(problem.knobs, sens)
    done = {_params_key(t.params): t for t in _complete(study)}
    dists = _distributions(problem.knobs)
    state = {"new": 0}
    log(f"fast search: {len(path)} settings from most to least aggressive; bisection needs about "
        f"{max(1, math.ceil(math.log2(len(path) + 1)))} evaluations")
    bar = tqdm(desc="search (fast)", disable=None if progress else True, leave=False, dynamic_ncols=True)

    def metric_at(i: int) -> float:
        values = path[i]
        key = _params_key(values)
        if key in done:
            t = done[key]
            log(f"  setting {i}/{len(path) - 1}: trial {t.number} (stored) val {t.values[0]:.4f}, "
                f"{OBJECTIVE_LABELS[problem.objective]} {t.values[1]:,.0f}")
            return t.values[0]
        if stop_after is not None and state["new"] >= stop_after:
            raise KeyboardInterrupt("stopped (stop_after)")
        ev = problem.evaluate(values)
        attrs: dict[str, Any] = {}
        _record(attrs, ev, 0)
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists, values=[ev.metric, ev.objective],
                                                  user_attrs=attrs, constraints={"budget": floor - ev.metric}))
        state["new"] += 1
        bar.update(1)
        done[key] = next(t for t in reversed(_complete(study)) if _params_key(t.params) == key)
        log(f"  setting {i}/{len(path) - 1}: val {ev.metric:.4f} ({'meets' if ev.metric >= floor else 'misses'} "
            f"{floor:.4f}), {OBJECTIVE_LABELS[problem.objective]} {ev.objective:,.0f}")
        return ev.metric

    try:
        lo, hi = -1, len(path) - 1  # path[lo] misses (virtually), path[hi] is the mildest
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if metric_at(mid) >= floor:
                hi = mid
            else:
                lo = mid
        metric_at(hi)
    finally:
        bar.close()
    return state["new"]


def _optimize(problem: Problem, study, total: int, worker: int, floor: float, progress: bool) -> None:
    """Run trials until the study holds ``total`` complete ones (counting every worker's)."""
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    knobs = problem.knobs

    def objective(trial) -> tuple[float, float]:
        values = {}
        for k in knobs:
            values[k.name] = (trial.suggest_categorical(k.name, list(k.choices)) if k.choices is not None
                              else trial.suggest_float(k.name, k.low, k.high))
        ev = problem.evaluate(values)
        attrs: dict[str, Any] = {}
        _record(attrs, ev, worker)
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        trial.set_constraint("budget", floor - ev.metric)
        return ev.metric, ev.objective

    done = len(_complete(study))
    if done >= total:
        return
    # One bar (worker 0's) counting the finished trials of every worker.
    bar = tqdm(total=total, initial=done, desc="search (optuna)", disable=None if progress and worker == 0 else True,
               leave=False, dynamic_ncols=True)

    def show(study, trial) -> None:
        bar.n = len(_complete(study))
        bar.refresh()

    try:
        study.optimize(objective, n_trials=total - done, catch=(ConfigError, UnsupportedModelError),
                       callbacks=[MaxTrialsCallback(total, states=(TrialState.COMPLETE,)), show])
    finally:
        bar.close()


def _quiet_optuna(fn: Callable) -> Callable:
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


@_quiet_optuna
def _worker_main(payload: dict[str, Any]) -> None:
    """A spawned worker process: rebuild the problem from the recipe and the coordinator's baseline, run trials."""
    from ..export.checkpoint import load
    from ..pipeline.recipe import build_data, metric_function

    torch.set_num_threads(payload["threads"])
    os.environ.setdefault("TQDM_DISABLE", "1")
    recipe: Recipe = payload["recipe"]
    data = build_data(recipe)
    baseline = load(payload["baseline"])
    problem = Problem(recipe, baseline, data, objective=payload["objective"], metric_fn=metric_function(recipe),
                      save_kw=payload["save_kw"])
    storage = open_storage(payload["storage"])
    study = _study(storage, payload["study_name"], _sampler(payload["seed"]), create=False)
    _optimize(problem, study, payload["trials"], payload["worker"], payload["floor"], progress=False)


# ----------------------------------------------------------------------------------------------
# The search


@dataclasses.dataclass
class SearchResult:
    """The chosen model (re-run from its setting and measured on the test split), whether it meets the budget on
    the validation split (``feasible``), the chosen point and the Pareto front (validation metric vs objective),
    and the report written to ``out_dir`` (None for a worker-only run)."""

    model: nn.Module | None
    feasible: bool
    chosen: dict[str, Any] | None
    front: list[dict[str, Any]]
    points: list[dict[str, Any]]
    report: dict[str, Any] | None
    n_complete: int
    study_name: str
    storage: str


def _resolve_settings(recipe: Recipe, **overrides: Any) -> dict[str, Any]:
    spec = recipe.search
    out = {k: (v if v is not None else getattr(spec, k)) for k, v in overrides.items()}
    dataclasses.replace(spec, **out)  # validates the overrides with the recipe's own checks
    return out


@_quiet_optuna
def search(recipe: str | Path | Recipe, out_dir: str | Path, *, max_accuracy_drop: float | None = None,
           objective: str | None = None, strategy: str | None = None, trials: int | None = None,
           storage: str | None = None, study_name: str | None = None, workers: int | None = None,
           worker_only: bool = False, overwrite: bool = False, model: nn.Module | None = None, data=None,
           progress: bool = True, log: Callable[[str], None] = print, _stop_after: int | None = None
           ) -> SearchResult:
    """Choose per-layer rates for the recipe's stages (whichever fields their configs make searchable) that
    minimise ``objective`` (``size``: bytes of the saved checkpoint, ``latency``: measured, ``macs``: counted)
    subject to the metric on the validation split >= baseline - ``max_accuracy_drop``; write the report, the
    Pareto plot and model.slim to ``out_dir``. ``None`` arguments take the recipe's ``search``/``budget`` values.

    Trials live in ``storage`` (default ``sqlite:///OUT/search.db``): run the same command again to resume;
    ``workers`` > 1 runs that many processes on this machine (``optuna`` strategy); ``worker_only`` joins another
    machine's study through a shared storage URL and only runs trials. ``model``/``data`` replace the recipe's
    (a trained model, left untouched, and a :class:`~torchslim.data.Splits`).

    When no setting meets the budget, the report shows the best one found and says so (``feasible`` False);
    ``budget.met`` in the report is False also when the chosen model misses the budget on the test split."""
    from ..export.checkpoint import load, save
    from ..pipeline.commands import (
        _model_name,
        _warn_if_missed,
        budget_markdown,
        budget_summary,
        check_outputs,
        measure_block,
        side_by_side_latency,
        publish,
    )
    from ..training.distributed import launched
    from ..pipeline.recipe import (
        build_data,
        build_model,
        check_against_model,
        metric_function,
        save_kwargs,
    )
    from ..training.train import default_device
    from ..pipeline.report import build_report

    if launched():
        raise ConfigError("run the search as one process, not under torchrun: it parallelises over trials "
                          "(--workers N, or --worker processes sharing a --storage URL)")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    s = _resolve_settings(recipe, objective=objective, strategy=strategy, trials=trials, storage=storage,
                          study_name=study_name, workers=workers)
    max_drop = recipe.budget.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
    if max_drop is None:
        raise ConfigError("search needs a budget: pass --max-accuracy-drop (max_accuracy_drop=) or set "
                          "budget.max_accuracy_drop in the recipe")
    if not 0 <= max_drop < 1:
        raise ConfigError(f"max_accuracy_drop must satisfy 0 <= max_accuracy_drop < 1, got {max_drop}")
    if s["strategy"] == "fast" and s["workers"] > 1:
        raise ConfigError("the fast strategy is a sequential bisection; use --strategy optuna for several workers")
    if (s["workers"] > 1 or worker_only) and (model is not None or data is not None):
        raise ConfigError("workers rebuild the data from the recipe: do not pass model=/data= with workers > 1")
    out = Path(out_dir)
    if not worker_only:
        check_outputs(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    url = s["storage"] or f"sqlite:///{(out / 'search.db').resolve()}"
    store = open_storage(url)  # an unreachable storage fails here, before any work
    name = s["study_name"] or f"torchslim-{recipe.key()}-{s['objective']}"
    _check_reducible(recipe, s["objective"])

    data = data if data is not None else build_data(recipe)
    example = data.example_inputs(recipe.example_batch)
    metric_fn = metric_function(recipe)
    baseline_path = out / f"baseline-{recipe.key()}.slim"
    if worker_only and recipe.model is not None and recipe.model.train is not None:
        # The recipe trains its model: the worker needs the coordinator's (a shared --out folder).
        _wait_for(baseline_path.is_file, f"the coordinator's baseline {baseline_path}", log)
    if model is not None:
        check_against_model(recipe, model, example)
        baseline = copy_model(model).cpu().eval()
    elif baseline_path.is_file():
        log(f"reusing the baseline model of this recipe: {baseline_path}")
        baseline = load(baseline_path).eval()
    else:
        baseline = build_model(recipe, data, log, check=True)
    save_kw = save_kwargs(recipe, baseline)
    if not worker_only and (model is not None or not baseline_path.is_file()):
        save(baseline, baseline_path, overwrite=True, **save_kw)  # what spawned workers load

    problem = Problem(recipe, baseline, data, objective=s["objective"], metric_fn=metric_fn, save_kw=save_kw)
    if not problem.knobs:
        raise ConfigError(f"nothing to search: no stage of {recipe.source} has a searchable field (searchable types: "
                          f"{sorted(BUILTIN.searchable())}; a stage with search: false is frozen)")
    baseline_val = float(metric_fn(baseline, data.val))
    floor = baseline_val - max_drop
    sampler = _sampler(recipe.seed)
    if worker_only:
        def described_study():
            try:
                study = _study(store, name, sampler, create=False)
            except StorageError:
                return None
            return study if _ATTR in study.user_attrs else None

        study = _wait_for(described_study, f"study {name!r} in {_redact(url)}", log)
    else:
        study = _study(store, name, sampler)
    meta = {"recipe_key": recipe.key(), "objective": s["objective"], "knobs": [k.name for k in problem.knobs],
            "baseline": _fingerprint(baseline)}
    stored = study.user_attrs.get(_ATTR)
    if stored is None:
        study.set_user_attr(_ATTR, meta)
    else:
        differs = [k for k, v in meta.items() if stored.get(k) != v]
        if differs:
            raise StorageError(f"study {name!r} in {_redact(url)} was measured with a different "
                               f"{' and '.join(differs)} "
                               "(its trials would not compare); pass another --study-name or storage, or delete it")
    log(f"search: {len(problem.knobs)} knobs, objective {s['objective']}, strategy {s['strategy']}, baseline "
        f"{recipe.metric} {baseline_val:.4f} (val), floor {floor:.4f}; study {name!r} in {_redact(url)} "
        f"({len(_complete(study))} finished trial(s) stored)")

    if worker_only:
        _optimize(problem, study, s["trials"], worker=os.getpid(), floor=floor, progress=progress)
        return SearchResult(None, False, None, [], [], None, len(_complete(study)), name, _redact(url))

    sens = study.user_attrs.get("sensitivity")
    if sens is None or set(sens["knobs"]) != set(meta["knobs"]):
        log("one-shot sensitivity of every knob (validation split)")
        sens = knob_sensitivity(baseline, problem.stages, problem.knobs, data, example, metric_fn=metric_fn,
                                objective_fn=problem.objective_value, apply=problem.apply, progress=progress)
        study.set_user_attr("sensitivity", sens)
    worker_errors: list[str] = []
    if s["strategy"] == "fast":
        _fast(problem, study, floor, sens, log, progress, stop_after=_stop_after)
    else:
        if not study.trials:
            path = lagrangian_path(problem.knobs, sens)
            picks = sorted({round(i * (len(path) - 1) / 3) for i in range(4)}) if len(path) > 1 else [0]
            for i in picks[: max(0, s["trials"] // 4)] or picks[:1]:
                study.enqueue_trial(path[i], skip_if_exists=True)
        worker_errors = _run_workers(problem, study, recipe, s, name, url, baseline_path, save_kw, floor, progress)

    points = [_point(t) for t in _complete(study)]
    if not points:
        raise TorchslimError(f"no trial finished in study {name!r}; nothing to report")
    front = pareto_front(points)
    chosen, feasible = choose(points, floor)
    if not feasible:
        log(f"NO SETTING MEETS THE BUDGET: the best found scores {chosen['metric']:.4f} on val, floor {floor:.4f}")

    # The chosen setting is re-run (deterministically) to get its model and per-stage test metrics.
    trial = next(t for t in _complete(study) if t.number == chosen["trial"])
    threads = torch.get_num_threads()
    torch.set_num_threads(int(trial.user_attrs.get("threads", threads)))
    try:
        log(f"re-running the chosen setting (trial {chosen['trial']}) and measuring it on the test split")
        ev = problem.evaluate(chosen["params"], keep_model=True,
                              describe=lambda m: {"accuracy": float(metric_fn(m, data.test)), "split": "test"})
    finally:
        torch.set_num_threads(threads)
    rerun_note = None
    if abs(ev.metric - chosen["metric"]) > 1e-9:
        rerun_note = (f"the re-run scored {ev.metric:.4f} on val, the trial {chosen['metric']:.4f} "
                      "(non-deterministic kernels or a different machine); the report uses the re-run")
        log("WARNING: " + rerun_note)
    final = ev.model
    baseline_block = measure_block(baseline, example, data.test, metric_fn, save_kw)
    compressed = measure_block(final, example, data.test, metric_fn, save_kw)
    side_by_side_latency(baseline_block, baseline, compressed, final, example)
    budget = budget_summary(max_drop, recipe.metric, baseline_val, ev.metric, baseline_block["accuracy"],
                            compressed["accuracy"])
    budget["feasible_found"] = feasible
    if not feasible:
        budget["met"] = False
    baseline_obj = sens["baseline"]["objective"]
    summary = {
        "strategy": s["strategy"], "objective": s["objective"], "study_name": name, "storage": _redact(url),
        "split": "val", "baseline_val": baseline_val, "floor": floor, "baseline_objective": baseline_obj,
        "n_trials_complete": len(points), "n_trials_failed": _count_failed(study),
        "chosen": {**chosen, "rerun_val": ev.metric, "rerun_note": rerun_note, "test": compressed["accuracy"]},
        "pareto_front": front, "knobs": [k.name for k in problem.knobs], "worker_errors": worker_errors,
        "plot": "pareto.png"}
    report = build_report(model_name=_model_name(recipe, baseline), dataset=data.name,
                          device=str(default_device()),
                          baseline=baseline_block, compressed=compressed, stages=ev.stages, checkpoint="model.slim",
                          metric=recipe.metric, budget=budget, search=summary, recipe=recipe.to_dict())
    banner, section = budget_markdown(budget)
    if not feasible:
        banner = (f"> **BUDGET MISSED: no setting tried meets it.** The best found scores {chosen['metric']:.4f} "
                  "on val "
                  f"(floor {floor:.4f}); shown below.\n" + (banner + "\n" if banner.startswith(">") else ""))

    def draw(path: Path) -> None:
        plot_pareto(points, front, chosen, floor=floor, baseline={"metric": baseline_val, "objective": baseline_obj},
                    objective=s["objective"], path=path, test_metric=compressed["accuracy"],
                    title=f"{_model_name(recipe, baseline)} on {data.name}: "
                          f"{recipe.metric} vs {OBJECTIVE_LABELS[s['objective']]}")

    publish(out, report=report, model=final, history=[r["config"] for r in ev.stages if r["config"]],
            save_kw=save_kw, extra_markdown=section + _search_markdown(summary, problem.knobs, s["objective"]),
            banner=banner, plots={"pareto.png": draw})
    _warn_if_missed(budget, log)
    return SearchResult(final, feasible, chosen, front, points, report, len(points), name, _redact(url))


def _count_failed(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))


def _check_reducible(recipe: Recipe, objective: str) -> None:
    kinds = [(s.name, BUILTIN.of(s.config).search) for s in recipe.stages if s.search is not False]
    if any(sp is not None and any(objective in f.reduces for f in sp.fields) for _, sp in kinds):
        return
    names = [n for n, sp in kinds if sp is not None]
    if not names:
        raise ConfigError(f"nothing to search: no stage of {recipe.source} has a searchable field (searchable types: "
                          f"{sorted(BUILTIN.searchable())}; a stage with search: false is frozen)")
    raise ConfigError(f"objective {objective!r} cannot be reduced by the searchable stages {names or '(none)'}: e.g. "
                      "unstructured zeros shrink the file but not the counted MACs or dense latency. Add a "
                      "StructuredPruning or low-rank stage, or choose --objective size")


def _run_workers(problem: Problem, study, recipe: Recipe, s: dict, name: str, url: str, baseline_path: Path,
                 save_kw: dict, floor: float, progress: bool) -> list[str]:
    """This process plus ``workers - 1`` spawned ones run trials against the storage; returns worker errors."""
    n = s["workers"]
    procs = []
    own_threads = torch.get_num_threads()
    if n > 1:
        # Workers share the cores instead of oversubscribing them.
        threads = max(1, (os.cpu_count() or 1) // n)
        ctx = multiprocessing.get_context("spawn")
        for w in range(1, n):
            payload = {"recipe": recipe, "baseline": str(baseline_path), "objective": s["objective"],
                       "save_kw": save_kw, "storage": url, "study_name": name, "trials": s["trials"],
                       "worker": w, "seed": recipe.seed + w, "floor": floor, "threads": threads}
            p = ctx.Process(target=_worker_main, args=(payload,), daemon=False)
            p.start()
            procs.append(p)
        torch.set_num_threads(threads)
    try:
        _optimize(problem, study, s["trials"], worker=0, floor=floor, progress=progress)
    finally:
        for p in procs:
            p.join()
        torch.set_num_threads(own_threads)
    return [f"worker {i + 1} exited with code {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]


def _search_markdown(summary: dict[str, Any], knobs: Sequence[Knob], objective: str) -> str:
    label = OBJECTIVE_LABELS[objective]
    c = summary["chosen"]
    lines = ["## Search", "",
             f"Strategy **{summary['strategy']}**, objective **{label}**, {summary['n_trials_complete']} finished "
             f"trial(s) ({summary['n_trials_failed']} failed) in study `{summary['study_name']}` "
             f"({summary['storage']}). Decisions use the validation split; the test split is measured only for "
             "the chosen model.", "",
             f"Chosen: trial {c['trial']}, {c['metric']:.4f} on val (floor {summary['floor']:.4f}), "
             f"{c['test']:.4f} on test, {label} {c['objective']:,.0f}.", ""]
    if c.get("rerun_note"):
        lines += [f"> Note: {c['rerun_note']}", ""]
    for e in summary["worker_errors"]:
        lines += [f"> **Worker error**: {e}", ""]
    lines += ["| knob | chosen value |", "|---|---:|"]
    lines += [f"| {k.name} | {c['params'].get(k.name, k.mild):.4g} |" for k in knobs]
    lines += ["", "### Pareto front (validation split)", "", f"| trial | val metric | {label} |", "|---:|---:|---:|"]
    lines += [f"| {p['trial']} | {p['metric']:.4f} | {p['objective']:,.0f} |" for p in summary["pareto_front"]]
    lines += ["", "![Pareto front](pareto.png)", ""]
    return "\n".join(lines)
