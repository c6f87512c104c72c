"""The recipe runner behind ``torchslim compress`` / ``torchslim.compress``, and the report and publishing
helpers it shares with the search (the command line itself is :mod:`torchslim.cli.commands`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..core.errors import TorchslimError
from ..core.files import remove_stale, temp_folder, writable_folder
from ..core.technique import Techniques
from ..export import saved_size
from ..export.checkpoint import save
from ..metrics import compare_latency, profile
from ..metrics.significance import Judge, count_samples
from ..nn.inference import for_inference
from ..techniques import BUILTIN
from ..training import distributed
from ..training.train import default_device
from .baseline import baseline_model
from .guard import run_guarded
from .recipe import (Recipe, build_data, check_against_model, load_recipe, metric_function, reseed,
                     save_kwargs)
from .report import build_report, plot_accuracy_vs_size, render_markdown
from .runner import StageInputs

__all__ = ["run_recipe", "reused_markdown", "measure_block", "side_by_side_latency", "budget_summary", "publish",
           "model_name", "warn_if_missed", "BudgetMissedWarning"]

OUTPUT_NAMES = ("report.json", "report.md", "model.slim")


# ----------------------------------------------------------------------------------------------
# Shared by compress and search


def measure_block(model: nn.Module, example_inputs: tuple, loader, metric_fn: Callable,
                  save_kw: dict | None = None) -> dict[str, Any]:
    """The report's metric block: ``metric_fn`` on ``loader`` (under the key ``accuracy``) plus the profile.

    ``latency_ms`` is left None: ``side_by_side_latency`` fills it for the baseline and the compressed model
    together, so that machine noise hits both alike."""
    p = profile(model, example_inputs, latency=False)
    return {"accuracy": float(metric_fn(model, loader)), "params": p.params, "nonzero_params": p.nonzero_params,
            "table_params": p.table_params, "macs": p.macs, "latency_ms": None, "size_bytes": saved_size(model, **(save_kw or {}))}


def side_by_side_latency(baseline_block: dict, baseline: nn.Module, compressed_block: dict, compressed: nn.Module,
                         example_inputs: tuple) -> dict[str, Any]:
    """Fill ``latency_ms`` of both blocks from one interleaved measurement, each model in the form it is deployed
    in (``torchslim.load(..., for_inference=True)``: masks folded, shared weights decoded); returns how noisy it
    was (the report's ``latency_noise``: spread of the repeats, load average, CPUs, ``noisy``)."""
    noise: dict[str, Any] = {}
    lat = compare_latency({"baseline": for_inference(baseline), "compressed": for_inference(compressed)},
                          example_inputs, noise=noise)
    baseline_block["latency_ms"], compressed_block["latency_ms"] = lat["baseline"], lat["compressed"]
    return noise


def budget_summary(max_drop: float | None, metric: str, baseline_val: float, final_val: float,
                   baseline_test: float, final_test: float, *, judged: dict[str, Any] | None = None,
                   resolution: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's ``budget`` block: drops on the validation split (what decisions used) and on test.

    ``judged`` (:meth:`torchslim.metrics.significance.Judge.assess` of the final model) makes the validation
    verdict the upper confidence bound's, and ``resolution`` (``Judge.resolution()``) records how many samples
    the decision rests on and whether the split can resolve the budget."""
    out: dict[str, Any] = {"metric": metric, "max_accuracy_drop": max_drop, "baseline_val": baseline_val,
                           "final_val": final_val, "drop_val": baseline_val - final_val,
                           "baseline_test": baseline_test, "final_test": final_test,
                           "drop_test": baseline_test - final_test}
    if judged is not None:
        out.update(drop_val_bound=judged["drop_bound"], confidence=judged["confidence"], val_samples=judged["n"],
                   decision_method=judged["method"])
    if resolution is not None:
        out.update(val_samples=resolution["n"], smallest_certifiable_drop=resolution["smallest_certifiable_drop"],
                   resolution_warning=resolution["warning"])
    if max_drop is None:
        out.update(met_val=None, met_test=None, met=None)
    else:
        # A hair of slack keeps float noise in the subtraction from flipping an exact tie.
        out["met_val"] = judged["met"] if judged is not None else out["drop_val"] <= max_drop + 1e-12
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
    notes = []
    if budget.get("drop_val_bound") is not None:
        notes.append(f"The validation verdict rests on {budget['val_samples']:,} samples: the drop's one-sided "
                     f"{100 * budget['confidence']:.0f}% upper bound ({budget['decision_method']}) is "
                     f"{100 * budget['drop_val_bound']:.2f} points, and it must be within the limit.")
    elif budget.get("val_samples") is not None:
        notes.append(f"The validation verdict rests on {budget['val_samples']:,} samples.")
    if budget.get("resolution_warning"):
        notes.append(f"**Warning:** {budget['resolution_warning']}.")
    if notes:
        section += "\n\n".join(notes) + "\n\n"
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
    tmp = temp_folder(out, ".publish-")
    try:
        ckpt = tmp / "model.slim"
        save(model, ckpt, history=history, metrics={"accuracy": report["compressed"]["accuracy"]}, **save_kw)
        # The report's size is the real file, not an estimate.
        report["compressed"]["size_bytes"] = ckpt.stat().st_size
        if report["stages"]:  # the final stage's model is this file: one figure for it everywhere
            report["stages"][-1]["size_bytes"] = report["compressed"]["size_bytes"]
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
        # An old report goes first: killed mid-way, the folder must not pair it with the new model.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / "report.json")
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
               techniques: Techniques = BUILTIN, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a recipe under the guard rails and write report.json, report.md, the plot and model.slim to
    ``out_dir``; returns the report. ``model`` (a trained model, left untouched) and ``data`` (a
    :class:`~torchslim.data.Splits`) replace what the recipe names; ``max_accuracy_drop`` its budget;
    ``loss_fn`` is what every training stage minimises and ``metric(model, loader)`` what the budget is measured in
    (defaults: cross-entropy and the recipe's metric); ``techniques`` the registry stage types resolve in.

    A result that misses the budget is written with ``budget.met`` False and a loud banner, and a
    ``BudgetMissedWarning`` is issued; the CLI exits with code 3."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, techniques=techniques)
    out = Path(out_dir)
    check_outputs(out, overwrite)
    writable_folder(out)  # an unwritable output folder fails now, not after the work
    remove_stale(out)  # what a killed run left
    max_drop = recipe.budget.max_accuracy_drop if max_accuracy_drop is None else max_accuracy_drop
    data = data if data is not None else build_data(recipe)
    example = data.example_inputs(recipe.example_batch)
    metric_fn = metric if metric is not None else metric_function(recipe)
    reused = None
    if model is None:
        model, reused = baseline_model(recipe, data, log, techniques=techniques, example_inputs=example)
    else:
        check_against_model(recipe, model, example, techniques)
    save_kw = save_kwargs(recipe, model)
    reseed(data, recipe.seed)
    judge = None if max_drop is None else Judge(model, data.val, max_drop, metric_fn=metric_fn,
                                                confidence=recipe.budget.confidence, holdout=count_samples(data.test))
    baseline_val = float(metric_fn(model, data.val)) if judge is None else judge.baseline_value
    baseline = measure_block(model, example, data.test, metric_fn, save_kw)
    log(f"baseline: {recipe.metric} {baseline_val:.4f} (val), {baseline['accuracy']:.4f} (test), "
        f"{baseline['size_bytes']:,} bytes on disk")
    resolution = judge.resolution() if judge is not None else None
    if resolution is not None and resolution["warning"]:
        log("WARNING: " + resolution["warning"])

    def describe(m: nn.Module) -> dict[str, Any]:
        return {"accuracy": float(metric_fn(m, data.test)), "size_bytes": saved_size(m, **save_kw)}

    inputs = StageInputs(data=data, example_inputs=example, teacher=model, loss_fn=loss_fn, metric=metric,
                         techniques=techniques)
    result = run_guarded(model, recipe.stages, inputs, metric_fn=metric_fn, baseline_val=baseline_val,
                         max_drop=max_drop, guard=recipe.guard, describe=describe, log=log, judge=judge)
    final = result.model.cpu()
    compressed = measure_block(final, example, data.test, metric_fn, save_kw)
    noise = side_by_side_latency(baseline, model, compressed, final, example)
    judged = result.judged
    if judge is not None and judged is None:  # every stage rolled back: the baseline, judged against itself
        judged = judge.assess(judge.paired(final))
    budget = budget_summary(max_drop, recipe.metric, baseline_val, result.final_val, baseline["accuracy"],
                            compressed["accuracy"], judged=judged, resolution=resolution)
    report = build_report(model_name=model_name(recipe, model), dataset=data.name, device=str(default_device()),
                          baseline=baseline, compressed=compressed, stages=result.records, checkpoint="model.slim",
                          metric=recipe.metric, budget=budget, guard={"policy": recipe.guard.policy,
                                                                      "events": result.events},
                          recipe=recipe.to_dict(), latency_noise=noise, title=recipe.name)
    report["baseline_reused_from"] = None if reused is None else str(reused)
    if distributed.is_main_process():
        banner, section = budget_markdown(budget)
        extra = section + _guard_markdown(result.events) + reused_markdown(reused)
        publish(out, report=report, model=final, history=[r["config"] for r in result.records], save_kw=save_kw,
                extra_markdown=extra, banner=banner)
    warn_if_missed(budget, log)
    return report


def reused_markdown(reused: Path | None) -> str:
    """The report's note on a baseline taken from the cache (empty when it was trained in this run)."""
    return "" if reused is None else f"\nReused cached baseline from `{reused}` (same recipe model/data and seed).\n"


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
    if budget.get("met") is False:
        msg = (f"BUDGET MISSED: {budget['metric']} drop {100 * budget['drop_val']:.2f} points on val, "
               f"{100 * budget['drop_test']:.2f} on test; limit {100 * budget['max_accuracy_drop']:.2f}")
        log(msg)
        warnings.warn(msg, BudgetMissedWarning, stacklevel=3)
