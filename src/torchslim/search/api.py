"""``torchslim.search``: per-layer rates minimising size, latency or MACs subject to
``metric >= baseline - max_accuracy_drop`` on the validation split (the test split is only for the report)."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..core.errors import ConfigError, TorchslimError
from ..core.files import remove_stale, writable_folder
from ..export.checkpoint import save
from ..metrics.significance import Judge, count_samples
from ..nn.modules import copy_model
from ..pipeline.baseline import baseline_model
from ..pipeline.commands import (
    budget_markdown,
    budget_summary,
    check_outputs,
    measure_block,
    model_name,
    publish,
    reused_markdown,
    side_by_side_latency,
    warn_if_missed,
)
from ..pipeline.recipe import (
    Recipe,
    build_data,
    check_against_model,
    load_checkpoint,
    load_recipe,
    metric_function,
    save_kwargs,
)
from ..pipeline.report import build_report
from ..techniques import BUILTIN
from ..training.distributed import launched
from ..training.train import default_device
from .knobs import Knob
from .options import SearchOptions
from .pareto import OBJECTIVE_LABELS, choose, pareto_front, plot_pareto
from .problem import Evaluation, Problem
from .scan import knob_sensitivity
from .storage import (
    complete,
    count_failed,
    describe_study,
    fingerprint,
    open_storage,
    open_study,
    point,
    redact,
    tpe_sampler,
)
from .strategies import fast, optimize, quiet_optuna, warm_start
from .workers import join_study, run_workers, wait_for

__all__ = ["search", "SearchResult", "SearchOptions", "Problem", "Evaluation"]

# The keyword arguments search() took before SearchOptions, and the option each now sets.
_LEGACY = {name: name for name in ("max_accuracy_drop", "objective", "strategy", "trials", "storage", "study_name",
                                   "workers", "worker_only", "overwrite", "progress")}
_LEGACY["_stop_after"] = "stop_after"


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


@quiet_optuna
def search(recipe: str | Path | Recipe, out_dir: str | Path, options: SearchOptions | None = None, *,
           model: nn.Module | None = None, data=None, loss_fn=None,
           metric: Callable[[nn.Module, Any], float] | None = None, log: Callable[[str], None] = print,
           **legacy: Any) -> SearchResult:
    """Choose per-layer rates for the recipe's stages (whichever fields their configs make searchable) that
    minimise the objective (``size``: bytes of the saved checkpoint, ``latency``: measured, ``macs``: counted)
    subject to the metric on the validation split >= baseline - ``max_accuracy_drop``; write the report, the
    Pareto plot and model.slim to ``out_dir``. ``options`` (:class:`SearchOptions`) default to the recipe's
    ``search``/``budget`` values.

    Trials live in ``options.storage`` (default ``sqlite:///OUT/search.db``): run the same search again to
    resume; ``workers`` > 1 runs that many processes on this machine (``optuna`` strategy); ``worker_only``
    joins another machine's study through a shared storage URL and only runs trials. ``model``/``data`` replace
    the recipe's (a trained model, left untouched, and a :class:`~torchslim.data.Splits`); ``loss_fn`` is what
    the training stages minimise and ``metric(model, loader)`` what the budget is measured in (defaults:
    cross-entropy and the recipe's metric; both need this process's objects, so not with ``workers`` > 1).

    When no setting meets the budget, the report shows the best one found and says so (``feasible`` False);
    ``budget.met`` in the report is False also when the chosen model misses the budget on the test split.
    The keyword arguments of earlier releases (``objective=``, ``trials=``...) still work, with a
    DeprecationWarning."""
    options = _options(options, legacy)
    if launched():
        raise ConfigError("run the search as one process, not under torchrun: it parallelises over trials "
                          "(--workers N, or --worker processes sharing a --storage URL)")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out_dir)
    o = options.resolve(recipe, out)
    if (o.workers > 1 or o.worker_only) and any(x is not None for x in (model, data, loss_fn, metric)):
        raise ConfigError("workers rebuild the model, data and metric from the recipe: do not pass model=, data=, "
                          "loss_fn= or metric= with workers > 1")
    if not o.worker_only:
        check_outputs(out, o.overwrite)
    writable_folder(out)
    remove_stale(out)  # what a killed run left
    store = open_storage(o.storage)  # an unreachable storage fails here, before any work
    _check_reducible(recipe, o.objective)

    data = data if data is not None else build_data(recipe)
    example = data.example_inputs(recipe.example_batch)
    metric_fn = metric if metric is not None else metric_function(recipe)
    baseline, baseline_path, reused = _baseline(recipe, out, o, model, data, example, log)
    save_kw = save_kwargs(recipe, baseline)
    if not o.worker_only and (model is not None or not baseline_path.is_file()):
        save(baseline, baseline_path, overwrite=True, **save_kw)  # what spawned workers load

    judge = Judge(baseline, data.val, o.max_accuracy_drop, metric_fn=metric_fn, confidence=o.confidence,
                  holdout=count_samples(data.test))
    problem = Problem(recipe, baseline, data, objective=o.objective, metric_fn=metric_fn, save_kw=save_kw,
                      loss_fn=loss_fn, stage_metric=metric, judge=judge, max_latency_ratio=o.max_latency_ratio)
    if not problem.knobs:
        raise ConfigError(f"nothing to search: no stage of {recipe.source} has a searchable field (searchable types: "
                          f"{sorted(BUILTIN.searchable())}; a stage with search: false is frozen)")
    baseline_val = judge.baseline_value
    floor = baseline_val - o.max_accuracy_drop
    resolution = judge.resolution()
    sampler = tpe_sampler(recipe.seed)
    if o.worker_only:
        study = join_study(store, o.study_name, o.storage, sampler, log)
    else:
        study = open_study(store, o.study_name, sampler)
    knob_names = [k.name for k in problem.knobs]
    describe_study(study, {"recipe_key": recipe.key(), "objective": o.objective, "knobs": knob_names,
                           "baseline": fingerprint(baseline)}, o.study_name, o.storage)
    log(f"search: {len(problem.knobs)} knobs, objective {o.objective}, strategy {o.strategy}, baseline "
        f"{recipe.metric} {baseline_val:.4f} (val), floor {floor:.4f}; study {o.study_name!r} in {redact(o.storage)} "
        f"({len(complete(study))} finished trial(s) stored)")
    log(f"budget decisions: the {100 * o.confidence:.0f}% upper bound of the drop, from {judge.n:,} val samples and "
        f"predicting {judge.holdout:,} test samples, must be <= {100 * o.max_accuracy_drop:.2f} points")
    if resolution["warning"] and not o.worker_only:
        log("WARNING: " + resolution["warning"])

    if o.worker_only:
        optimize(problem, study, o.trials, worker=os.getpid(), floor=floor, progress=o.progress, log=log)
        return SearchResult(None, False, None, [], [], None, len(complete(study)), o.study_name, redact(o.storage))

    sens = study.user_attrs.get("sensitivity")
    if sens is None or set(sens["knobs"]) != set(knob_names):
        log("one-shot sensitivity of every knob (validation split)")
        # Each finished point is stored, so that a killed scan resumes where it stopped.
        sens = knob_sensitivity(baseline, problem.stages, problem.knobs, data, example, metric_fn=metric_fn,
                                objective_fn=problem.objective_value, progress=o.progress,
                                resume=study.user_attrs.get("sensitivity_partial"),
                                on_point=lambda partial: study.set_user_attr("sensitivity_partial", partial))
        study.set_user_attr("sensitivity", sens)
    worker_errors: list[str] = []
    if o.strategy == "fast":
        fast(problem, study, floor, sens, log, o.progress, stop_after=o.stop_after)
    else:
        warm_start(study, problem.knobs, sens, o.trials)
        worker_errors = run_workers(problem, study, recipe, o, baseline_path, save_kw, floor, log=log)

    points = [_judged(point(t), judge) for t in complete(study)]
    if not points:
        raise TorchslimError(f"no trial finished in study {o.study_name!r}; nothing to report")
    chosen, feasible = choose(points, floor, o.max_latency_ratio)
    if not feasible:
        log(f"NO SETTING MEETS THE BUDGET: the best found scores {chosen['metric']:.4f} on val (certified "
            f"{chosen['certified']:.4f}), floor {floor:.4f}")
    ev = _rerun(problem, study, chosen, data, metric_fn, log)
    return _publish(out, recipe, o, problem, study, ev, points=points, chosen=chosen, feasible=feasible,
                    baseline_val=baseline_val, baseline_obj=sens["baseline"]["objective"],
                    worker_errors=worker_errors, example=example, reused=reused, log=log, judge=judge)


def _judged(p: dict[str, Any], judge: Judge) -> dict[str, Any]:
    """A point with its budget decision: ``certified`` (baseline minus the upper bound of the drop), the bound and
    the verdict; trials stored without a paired record (older studies) are judged on the point estimate."""
    paired = p.pop("paired", None)
    if paired is None:
        return {**p, "certified": p["metric"], "drop_bound": None}
    a = judge.assess(paired)
    return {**p, "certified": a["certified"], "drop_bound": a["drop_bound"]}


def _options(options: SearchOptions | None, legacy: dict[str, Any]) -> SearchOptions:
    """``options``, or the deprecated keyword arguments mapped into SearchOptions."""
    if options is not None and not isinstance(options, SearchOptions):
        raise ConfigError(f"options must be a torchslim.SearchOptions, got {type(options).__name__}")
    if not legacy:
        return options or SearchOptions()
    unknown = sorted(set(legacy) - set(_LEGACY))
    if unknown:
        raise TypeError(f"search() got unexpected keyword argument(s) {unknown}")
    if options is not None:
        raise ConfigError(f"pass the search options in SearchOptions only, not also as keywords {sorted(legacy)}")
    spelled = ", ".join(f"{_LEGACY[k]}=..." for k in legacy)
    warnings.warn(f"search(recipe, out_dir, {', '.join(f'{k}=...' for k in legacy)}) is deprecated; write "
                  f"search(recipe, out_dir, SearchOptions({spelled}))", DeprecationWarning, stacklevel=_caller_level())
    return SearchOptions(**{_LEGACY[k]: v for k, v in legacy.items()})


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside this package, as seen from the function calling this one:
    a warning then names the user's line, not the callable package or the Optuna wrapper."""
    here = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def _baseline(recipe: Recipe, out: Path, o: SearchOptions, model: nn.Module | None, data, example,
              log: Callable[[str], None]) -> tuple[nn.Module, Path, Path | None]:
    """The model to compress (the caller's, the one this recipe saved before, or the recipe's through the
    baseline cache), the file spawned and remote workers load it from, and the cache entry it was reused from."""
    path = out / f"baseline-{recipe.key()}.slim"
    if o.worker_only and recipe.model is not None and recipe.model.train is not None:
        # The recipe trains its model: the worker needs the coordinator's (a shared --out folder).
        wait_for(path.is_file, f"the coordinator's baseline {path}", log)
    if model is not None:
        check_against_model(recipe, model, example)
        return copy_model(model).cpu().eval(), path, None
    if path.is_file():
        log(f"reusing the baseline model of this recipe: {path}")
        return load_checkpoint(recipe, path).eval(), path, None
    built, reused = baseline_model(recipe, data, log, example_inputs=example)
    return built, path, reused


def _rerun(problem: Problem, study, chosen: dict[str, Any], data, metric_fn: Callable,
           log: Callable[[str], None]) -> Evaluation:
    """The chosen setting re-run (deterministically, with the trial's thread count) for its model and per-stage
    test metrics."""
    trial = next(t for t in complete(study) if t.number == chosen["trial"])
    threads = torch.get_num_threads()
    torch.set_num_threads(int(trial.user_attrs.get("threads", threads)))
    try:
        log(f"re-running the chosen setting (trial {chosen['trial']}) and measuring it on the test split")
        return problem.evaluate(chosen["params"], keep_model=True,
                                describe=lambda m: {"accuracy": float(metric_fn(m, data.test)), "split": "test"})
    finally:
        torch.set_num_threads(threads)


def _publish(out: Path, recipe: Recipe, o: SearchOptions, problem: Problem, study, ev: Evaluation, *,
             points: list[dict[str, Any]], chosen: dict[str, Any], feasible: bool, baseline_val: float,
             baseline_obj: float, worker_errors: list[str], example: tuple, log: Callable[[str], None],
             judge: Judge, reused: Path | None = None) -> SearchResult:
    """Measure the chosen model (``ev``, re-run) against the baseline and write the report, the Pareto plot and
    model.slim."""
    baseline, data, metric_fn, save_kw = problem.baseline, problem.data, problem.metric_fn, problem.save_kw
    floor = baseline_val - o.max_accuracy_drop
    front = pareto_front(points)
    rerun_note = None
    if abs(ev.metric - chosen["metric"]) > 1e-9:
        rerun_note = (f"the re-run scored {ev.metric:.4f} on val, the trial {chosen['metric']:.4f} "
                      f"({_rerun_cause(data.train)}); the report uses the re-run")
        log("WARNING: " + rerun_note)
    final = ev.model
    baseline_block = measure_block(baseline, example, data.test, metric_fn, save_kw)
    compressed = measure_block(final, example, data.test, metric_fn, save_kw)
    noise = side_by_side_latency(baseline_block, baseline, compressed, final, example)
    judged = judge.assess(ev.paired) if ev.paired is not None else None
    budget = budget_summary(o.max_accuracy_drop, recipe.metric, baseline_val, ev.metric, baseline_block["accuracy"],
                            compressed["accuracy"], judged=judged, resolution=judge.resolution())
    budget["feasible_found"] = feasible
    if not feasible:
        budget["met"] = False
    storage = redact(o.storage)
    summary = {
        "strategy": o.strategy, "objective": o.objective, "max_latency_ratio": o.max_latency_ratio,
        "study_name": o.study_name, "storage": storage,
        "split": "val", "baseline_val": baseline_val, "floor": floor, "baseline_objective": baseline_obj,
        "n_trials_complete": len(points), "n_trials_failed": count_failed(study),
        "chosen": {**chosen, "rerun_val": ev.metric, "rerun_note": rerun_note, "test": compressed["accuracy"]},
        "pareto_front": front, "knobs": [k.name for k in problem.knobs], "worker_errors": worker_errors,
        "plot": "pareto.png"}
    name = model_name(recipe, baseline)
    report = build_report(model_name=name, dataset=data.name, device=str(default_device()),
                          baseline=baseline_block, compressed=compressed, stages=ev.stages, checkpoint="model.slim",
                          metric=recipe.metric, budget=budget, search=summary, recipe=recipe.to_dict(),
                          latency_noise=noise, title=recipe.name)
    report["baseline_reused_from"] = None if reused is None else str(reused)
    banner, section = budget_markdown(budget)
    if not feasible:
        banner = (f"> **BUDGET MISSED: no setting tried meets it.** The best found scores {chosen['metric']:.4f} "
                  "on val "
                  f"(floor {floor:.4f}); shown below.\n" + (banner + "\n" if banner.startswith(">") else ""))

    def draw(path: Path) -> None:
        plot_pareto(points, front, chosen, floor=floor, baseline={"metric": baseline_val, "objective": baseline_obj},
                    objective=o.objective, path=path, test_metric=compressed["accuracy"],
                    metric=recipe.metric,
                    title=f"{recipe.name if recipe.name != 'recipe' else name} on {data.name}: {recipe.metric} vs "
                          f"{OBJECTIVE_LABELS[o.objective]}")

    publish(out, report=report, model=final, history=[r["config"] for r in ev.stages if r["config"]],
            save_kw=save_kw, extra_markdown=section + _search_markdown(summary, problem.knobs, o.objective)
            + reused_markdown(reused),
            banner=banner, plots={"pareto.png": draw})
    warn_if_missed(budget, log)
    return SearchResult(final, feasible, chosen, front, points, report, len(points), o.study_name, storage)


def _rerun_cause(loader) -> str:
    """The likeliest reason a re-run of the same setting differs: the training loader's randomness first."""
    from torch.utils.data import DataLoader, RandomSampler

    if not isinstance(loader, DataLoader):
        return (f"the training data is a {type(loader).__name__}, not a DataLoader the search can re-seed: make it "
                "yield the same batches in the same order every time it is iterated")
    sampler = loader.sampler
    seeded = isinstance(loader.generator, torch.Generator) or \
        isinstance(getattr(sampler, "generator", None), torch.Generator)
    if isinstance(sampler, RandomSampler) and not seeded:
        return ("the training DataLoader shuffles without its own generator, so its order depends on what ran "
                "before: pass DataLoader(..., shuffle=True, generator=torch.Generator().manual_seed(0))")
    if loader.num_workers > 0:
        return (f"the training DataLoader has num_workers={loader.num_workers}: random transforms in worker "
                "processes are not re-seeded; seed them with worker_init_fn, or use num_workers=0")
    if not isinstance(sampler, (RandomSampler,)) and type(sampler).__module__.split(".")[0] != "torch":
        return f"the training DataLoader's sampler {type(sampler).__name__} is not re-seeded by the search"
    return "non-deterministic kernels, or another thread count than the trial's"


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


def _search_markdown(summary: dict[str, Any], knobs: Sequence[Knob], objective: str) -> str:
    label = OBJECTIVE_LABELS[objective]
    c = summary["chosen"]
    lines = ["## Search", "",
             f"Strategy **{summary['strategy']}**, objective **{label}**, {summary['n_trials_complete']} finished "
             f"trial(s) ({summary['n_trials_failed']} failed) in study `{summary['study_name']}` "
             f"({summary['storage']}). Decisions use the validation split; the test split is measured only for "
             "the chosen model.", "",
             f"Chosen: trial {c['trial']}, {c['metric']:.4f} on val (certified {c['certified']:.4f} against the "
             f"floor {summary['floor']:.4f}), {c['test']:.4f} on test"
             + ("; its saved file is the 'bytes on disk' above (the trials' sizes below leave out the stage "
                "history the file also holds)." if objective == "size" else f", {label} {c['objective']:,.0f}."),
             ""]
    if summary.get("max_latency_ratio") is not None:
        lines += [f"Latency ceiling: {summary['max_latency_ratio']}x the baseline's (inference form, measured side "
                  f"by side); the chosen setting measured {c.get('latency_ratio', float('nan')):.3f}x.", ""]
    if c.get("rerun_note"):
        lines += [f"> Note: {c['rerun_note']}", ""]
    for e in summary["worker_errors"]:
        lines += [f"> **Worker error**: {e}", ""]
    lines += ["| knob | chosen value |", "|---|---:|"]
    lines += [f"| {k.name} | {c['params'].get(k.name, k.mild):.4g} |" for k in knobs]
    lines += ["", "### Pareto front (validation split)", "",
              f"| trial | val metric | certified (val) | {label} |", "|---:|---:|---:|---:|"]
    lines += [f"| {p['trial']} | {p['metric']:.4f} | {p.get('certified', p['metric']):.4f} | {p['objective']:,.0f} |"
              for p in summary["pareto_front"]]
    lines += ["", "![Pareto front](pareto.png)", ""]
    return "\n".join(lines)
