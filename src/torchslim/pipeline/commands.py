"""``torchslim compress``, ``torchslim sensitivity`` and ``torchslim search``, the recipe runner behind
``compress``.

Exit codes: 0 success; 2 bad input or another torchslim error (``cli.main``); 3 the result misses the accuracy
budget (outputs are written and say so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core.errors import ConfigError, TorchslimError
from .recipe import Recipe, load_recipe
from .runner import StageInputs

__all__ = ["add_commands", "run_recipe", "finish", "measure_block", "side_by_side_latency", "budget_summary",
           "publish", "model_name", "warn_if_missed", "EXIT_BUDGET_MISSED"]

EXIT_BUDGET_MISSED = 3
OUTPUT_NAMES = ("report.json", "report.md", "model.slim")


# ----------------------------------------------------------------------------------------------
# Shared by compress and search


def measure_block(model: nn.Module, example_inputs: tuple, loader, metric_fn: Callable,
                  save_kw: dict | None = None) -> dict[str, Any]:
    """The report's metric block: ``metric_fn`` on ``loader`` (under the key ``accuracy``) plus the profile.

    ``latency_ms`` is left None: ``side_by_side_latency`` fills it for the baseline and the compressed model
    together, so that machine noise hits both alike."""
    from ..metrics import profile
    from ..metrics.profile import saved_size

    p = profile(model, example_inputs, size=False, latency=False)
    return {"accuracy": float(metric_fn(model, loader)), "params": p.params, "nonzero_params": p.nonzero_params,
            "macs": p.macs, "latency_ms": None, "size_bytes": saved_size(model, **(save_kw or {}))}


def side_by_side_latency(baseline_block: dict, baseline: nn.Module, compressed_block: dict, compressed: nn.Module,
                         example_inputs: tuple) -> None:
    """Fill ``latency_ms`` of both blocks from one interleaved measurement."""
    from ..metrics import compare_latency

    lat = compare_latency({"baseline": baseline, "compressed": compressed}, example_inputs)
    baseline_block["latency_ms"], compressed_block["latency_ms"] = lat["baseline"], lat["compressed"]


def budget_summary(max_drop: float | None, metric: str, baseline_val: float, final_val: float,
                   baseline_test: float, final_test: float) -> dict[str, Any]:
    """The report's ``budget`` block: drops on the validation split (what decisions used) and on test."""
    out: dict[str, Any] = {"metric": metric, "max_accuracy_drop": max_drop, "baseline_val": baseline_val,
                           "final_val": final_val, "drop_val": baseline_val - final_val,
                           "baseline_test": baseline_test, "final_test": final_test,
                           "drop_test": baseline_test - final_test}
    if max_drop is None:
        out.update(met_val=None, met_test=None, met=None)
    else:
        # A hair of slack keeps float noise in the subtraction from flipping an exact tie.
        out["met_val"] = out["drop_val"] <= max_drop + 1e-12
        out["met_test"] = out["drop_test"] <= max_drop + 1e-12
        out["met"] = out["met_val"] and out["met_test"]
    return out


def budget_markdown(budget: dict[str, Any]) -> tuple[str, str]:
    """(banner under the title, "## Budget" section)."""
    if budget["max_accuracy_drop"] is None:
        return "", ""
    limit = 100 * budget["max_accuracy_drop"]
    dv, dt = 100 * budget["drop_val"], 100 * budget["drop_test"]
    if budget["met"]:
        banner = f"Budget met: {budget['metric']} drop {dv:.2f} points on val, {dt:.2f} on test (limit {limit:.2f})."
    else:
        where = " and ".join(s for s, ok in (("validation", budget["met_val"]), ("test", budget["met_test"])) if not ok)
        banner = (f"> **BUDGET MISSED** on the {where} split: {budget['metric']} drop {dv:.2f} points on val, "
                  f"{dt:.2f} on test, limit {limit:.2f}. This model does not meet the requested budget.")
    ok = {True: "yes", False: "**NO**", None: "-"}
    section = "\n".join([
        "## Budget", "",
        "| split | baseline | final | drop (points) | limit | met |", "|---|---:|---:|---:|---:|---|",
        f"| validation (decisions) | {budget['baseline_val']:.4f} | {budget['final_val']:.4f} | {dv:.2f} | "
        f"{limit:.2f} | {ok[budget['met_val']]} |",
        f"| test (report only) | {budget['baseline_test']:.4f} | {budget['final_test']:.4f} | {dt:.2f} | "
        f"{limit:.2f} | {ok[budget['met_test']]} |", "", ""])
    return banner, section


def check_outputs(out: Path, overwrite: bool) -> None:
    if overwrite:
        return
    existing = [str(out / n) for n in OUTPUT_NAMES if (out / n).exists()]
    if existing:
        raise TorchslimError(f"{existing[0]} exists; pass --overwrite (overwrite=True) to replace the outputs in {out}")


def publish(out: Path, *, report: dict[str, Any], model: nn.Module, history: list, save_kw: dict,
            extra_markdown: str = "", banner: str = "", plots: dict[str, Callable[[Path], None]] | None = None
            ) -> dict[str, Path]:
    """Write model.slim, report.json, report.md and the plots into ``out``: built in a temporary folder beside
    it and moved in with report.json last, so an interrupted run never leaves a report for a model it lacks."""
    from ..export.checkpoint import save
    from .report import plot_accuracy_vs_size, render_markdown

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".publish-"))
    try:
        ckpt = tmp / "model.slim"
        save(model, ckpt, history=history, metrics={"accuracy": report["compressed"]["accuracy"]}, **save_kw)
        # The report's size is the real file, not an estimate.
        report["compressed"]["size_bytes"] = ckpt.stat().st_size
        b = report["baseline"]["size_bytes"]
        report["ratios"]["size"] = b / report["compressed"]["size_bytes"] if b else None
        plot_accuracy_vs_size(report, tmp / "accuracy_vs_size.png")
        for name, draw in (plots or {}).items():
            draw(tmp / name)
        md = render_markdown(report, "accuracy_vs_size.png")
        title, _, rest = md.partition("\n")
        md = (title + "\n\n" + (banner + "\n" if banner else "") + rest
              + ("\n" + extra_markdown if extra_markdown else ""))
        (tmp / "report.md").write_text(md)
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        names = [p.name for p in tmp.iterdir() if p.name != "report.json"] + ["report.json"]
        for name in names:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {n: out / n for n in names}


def model_name(recipe: Recipe, model: nn.Module) -> str:
    """The model's name in reports: the recipe's builtin, factory or checkpoint stem, else the class name."""
    m = recipe.model
    if m is None:
        return type(model).__name__
    return m.builtin or m.factory or Path(m.checkpoint or "model").stem


# ----------------------------------------------------------------------------------------------
# compress


def run_recipe(recipe: str | Path | Recipe, out_dir: str | Path, *, overwrite: bool = False,
               model: nn.Module | None = None, data=None, max_accuracy_drop: float | None = None,
               loss_fn=None, metric: Callable[[nn.Module, Any], float] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a recipe under the guard rails and write report.json, report.md, the plot and model.slim to
    ``out_dir``; returns the report. ``model`` (a trained model, left untouched) and ``data`` (a
    :class:`~torchslim.data.Splits`) replace what the recipe names; ``max_accuracy_drop`` its budget;
    ``loss_fn`` is what every training stage minimises and ``metric(model, loader)`` what the budget is measured in
    (defaults: cross-entropy and the recipe's metric).

    A result that misses the budget is written with ``budget.met`` False and a loud banner, and a
    ``BudgetMissedWarning`` is issued; the CLI exits with code 3."""
    from ..metrics.profile import saved_size
    from ..training import distributed
    from .guard import run_guarded
    from .recipe import (
        build_data,
        build_model,
        check_against_model,
        metric_function,
        reseed,
        save_kwargs,
    )
    from ..training.train import default_device

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out = Path(out_dir)
    check_outputs(out, overwrite)
    max_drop = recipe.budget.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
    data = data if data is not None else build_data(recipe)
    example = data.example_inputs(recipe.example_batch)
    metric_fn = metric if metric is not None else metric_function(recipe)
    if model is None:
        model = build_model(recipe, data, log, check=True)
    else:
        check_against_model(recipe, model, example)
    save_kw = save_kwargs(recipe, model)
    reseed(data, recipe.seed)
    baseline_val = float(metric_fn(model, data.val))
    baseline = measure_block(model, example, data.test, metric_fn, save_kw)
    log(f"baseline: {recipe.metric} {baseline_val:.4f} (val), {baseline['accuracy']:.4f} (test), "
        f"{baseline['size_bytes']:,} bytes on disk")

    def describe(m: nn.Module) -> dict[str, Any]:
        return {"accuracy": float(metric_fn(m, data.test)), "size_bytes": saved_size(m, **save_kw)}

    inputs = StageInputs(data=data, example_inputs=example, teacher=model, loss_fn=loss_fn, metric=metric)
    result = run_guarded(model, recipe.stages, inputs, metric_fn=metric_fn, baseline_val=baseline_val,
                         max_drop=max_drop, guard=recipe.guard, describe=describe, log=log)
    final = result.model.cpu()
    compressed = measure_block(final, example, data.test, metric_fn, save_kw)
    side_by_side_latency(baseline, model, compressed, final, example)
    budget = budget_summary(max_drop, recipe.metric, baseline_val, result.final_val, baseline["accuracy"],
                            compressed["accuracy"])
    from .report import build_report

    report = build_report(model_name=model_name(recipe, model), dataset=data.name, device=str(default_device()),
                          baseline=baseline, compressed=compressed, stages=result.records, checkpoint="model.slim",
                          metric=recipe.metric, budget=budget, guard={"policy": recipe.guard.policy,
                                                                      "events": result.events},
                          recipe=recipe.to_dict())
    if distributed.is_main_process():
        banner, section = budget_markdown(budget)
        extra = section + _guard_markdown(result.events)
        publish(out, report=report, model=final, history=[r["config"] for r in result.records], save_kw=save_kw,
                extra_markdown=extra, banner=banner)
    warn_if_missed(budget, log)
    return report


def _guard_markdown(events: list[dict[str, Any]]) -> str:
    if not events:
        return ""
    lines = ["## Guard rails", "", "| stages | action | attempts (val metric) |", "|---|---|---|"]
    for e in events:
        tries = ", ".join(f"{a['val_accuracy']:.4f}" for a in e["attempts"])
        lines.append(f"| {', '.join(e['stages'])} | **{e['action']}** | {tries} |")
    return "\n".join(lines) + "\n"


class BudgetMissedWarning(UserWarning):
    """A returned model misses the accuracy budget (the report says so too)."""


def warn_if_missed(budget: dict[str, Any], log: Callable[[str], None]) -> None:
    """Log and warn (``BudgetMissedWarning``) when ``budget`` says the result misses it."""
    import warnings

    if budget.get("met") is False:
        msg = (f"BUDGET MISSED: {budget['metric']} drop {100 * budget['drop_val']:.2f} points on val, "
               f"{100 * budget['drop_test']:.2f} on test; limit {100 * budget['max_accuracy_drop']:.2f}")
        log(msg)
        warnings.warn(msg, BudgetMissedWarning, stacklevel=3)


# ----------------------------------------------------------------------------------------------
# Command line


def _recipe_arg(args: argparse.Namespace) -> str:
    path = args.recipe_opt or args.recipe
    if path is None:
        raise ConfigError("name a recipe: torchslim COMMAND RECIPE.yaml (or --recipe RECIPE.yaml)")
    return path


def _default_out(recipe_path: str, command: str) -> str:
    return str(Path("out") / f"{Path(recipe_path).stem}-{command}")


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def _compress(args: argparse.Namespace) -> int:
    import warnings

    from ..training import distributed

    path = _recipe_arg(args)
    if args.validate_only:
        return _validate(path)
    recipe = load_recipe(path)
    out = args.out or _default_out(path, "compress")
    with distributed.process_group(), warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetMissedWarning)
        # Under torchrun every process runs the pipeline in lockstep; one of them talks.
        log = print if distributed.is_main_process() else (lambda s: None)
        report = run_recipe(recipe, out, overwrite=args.overwrite, max_accuracy_drop=args.max_accuracy_drop, log=log)
    if not distributed.is_main_process():
        return 0
    return finish(report, out)


def _validate(path: Path) -> int:
    """``--validate-only``: the recipe, its factories and files, the data, and the layer names it uses (the model
    is built but not trained)."""
    from .recipe import build_data, build_model

    recipe = load_recipe(path)
    build_model(recipe, build_data(recipe), check=True, train=False)
    print(f"{path}: valid ({len(recipe.stages)} stage(s): {', '.join(s.name for s in recipe.stages)}); "
          "model, data and layer names checked")
    return 0


def finish(report: dict[str, Any], out: str | Path) -> int:
    """Print the few lines a command ends with (metric, size, MACs and latency against the baseline) and return
    its exit code: ``EXIT_BUDGET_MISSED`` when the result misses the budget, else 0."""
    r = report["ratios"]
    lat = r["latency"]
    speed = f"latency {lat:.2f}x lower" if lat >= 1 else f"latency {1 / lat:.2f}x HIGHER"
    print(f"\n{report.get('metric', 'accuracy')} {report['baseline']['accuracy']:.4f} -> "
          f"{report['compressed']['accuracy']:.4f} on test (drop {100 * report['accuracy_drop']:.2f} points)")
    print(f"bytes on disk {report['baseline']['size_bytes']:,} -> {report['compressed']['size_bytes']:,} "
          f"({r['size']:.2f}x smaller); non-zero params {r['nonzero_params']:.1f}x fewer; MACs {r['macs']:.2f}x "
          f"fewer; {speed} (measured side by side at batch {report.get('recipe', {}).get('example_batch', 1)})")
    print(f"report: {Path(out) / 'report.md'}")
    if report["budget"].get("met") is False:
        _stderr(f"torchslim: BUDGET MISSED; the report shows what was found: {Path(out) / 'report.md'}")
        return EXIT_BUDGET_MISSED
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def _sensitivity(args: argparse.Namespace) -> int:
    from ..search.scan import sensitivity
    from .recipe import build_data, build_model, metric_function

    path = _recipe_arg(args)
    if args.validate_only:
        return _validate(path)
    recipe = load_recipe(path)
    out = Path(args.out or _default_out(path, "sensitivity"))
    if (out / "sensitivity.json").exists() and not args.overwrite:
        raise TorchslimError(f"{out / 'sensitivity.json'} exists; pass --overwrite to replace it")
    data = build_data(recipe)
    model = build_model(recipe, data, check=True)
    result = sensitivity(model, data.val, sparsities=_floats(args.sparsities),
                         bits=[int(b) for b in _floats(args.bits)], layers=args.layers or None,
                         metric=None if recipe.metric == "accuracy" else metric_function(recipe),
                         metric_name=recipe.metric)
    paths = result.write(out)
    print(result.to_markdown())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _search(args: argparse.Namespace) -> int:
    import warnings

    from ..search import SearchOptions, search

    path = _recipe_arg(args)
    if args.validate_only:
        return _validate(path)
    recipe = load_recipe(path)
    out = args.out or _default_out(path, "search")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetMissedWarning)
        options = SearchOptions(max_accuracy_drop=args.max_accuracy_drop, objective=args.objective,
                                strategy=args.strategy, trials=args.trials, storage=args.storage,
                                study_name=args.study_name, workers=args.workers, worker_only=args.worker,
                                overwrite=args.overwrite)
        result = search(recipe, out, options)
    if args.worker:
        print(f"worker done: {result.n_complete} complete trial(s) in the study")
        return 0
    return finish(result.report, out)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compress``, ``sensitivity`` and ``search`` to the ``torchslim`` command line."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("recipe", nargs="?", help="recipe YAML file")
        p.add_argument("--recipe", dest="recipe_opt", metavar="RECIPE",
                       help="recipe YAML file (same as the positional)")
        p.add_argument("--out", help="output folder (default out/<recipe>-<command>)")
        p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
        p.add_argument("--validate-only", action="store_true", help="check the recipe and stop")

    c = subparsers.add_parser("compress", help="run a recipe's stages with guard rails and write the report")
    common(c)
    c.add_argument("--max-accuracy-drop", type=float, help="budget (overrides the recipe's), e.g. 0.01 = 1 point")
    c.set_defaults(func=_compress)

    s = subparsers.add_parser("sensitivity", help="per-layer metric against sparsity and bit width (one-shot)")
    common(s)
    s.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98",
                   help="comma-separated sparsities to try per layer (default %(default)s)")
    s.add_argument("--bits", default="8,6,4,3,2", help="comma-separated weight bit widths (default %(default)s)")
    s.add_argument("--layers", nargs="*", help="fnmatch patterns of layers to scan (default: all Linear/Conv)")
    s.set_defaults(func=_sensitivity)

    q = subparsers.add_parser("search", help="per-layer rates minimising size/latency/MACs s.t. an accuracy budget")
    common(q)
    q.add_argument("--max-accuracy-drop", type=float, help="budget on the validation split (e.g. 0.005)")
    q.add_argument("--objective", choices=("size", "latency", "macs"))
    q.add_argument("--strategy", choices=("fast", "optuna"))
    q.add_argument("--trials", type=int, help="trials for the optuna strategy (all workers together)")
    q.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUT/search.db)")
    q.add_argument("--study-name", help="study name in the storage (default derived from the recipe)")
    q.add_argument("--workers", type=int, help="worker processes on this machine (optuna strategy)")
    q.add_argument("--worker", action="store_true",
                   help="only run trials against --storage (another machine's search writes the report)")
    q.set_defaults(func=_search)
