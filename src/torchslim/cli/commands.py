"""``torchslim compress``, ``torchslim sensitivity`` and ``torchslim search``.

Exit codes: 0 success; 2 bad input or another torchslim error (``cli.main``); 3 the result misses the accuracy
budget (outputs are written and say so).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError, TorchslimError
from ..core.files import writable_folder
from ..pipeline.commands import BudgetMissedWarning, run_recipe
from ..pipeline.baseline import baseline_model
from ..pipeline.recipe import build_data, build_model, load_recipe, metric_function
from ..search.api import search
from ..search.options import SearchOptions
from ..search.scan import sensitivity
from ..training import distributed

__all__ = ["add_commands", "add_threads_option", "command_parser", "finish", "EXIT_BUDGET_MISSED"]

EXIT_BUDGET_MISSED = 3


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
    path = _recipe_arg(args)
    if args.validate_only:
        return _validate(path)
    recipe = load_recipe(path)
    out = args.out or _default_out(path, "compress")
    with distributed.process_group(), warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetMissedWarning)
        # Under torchrun every process runs the pipeline in lockstep; one of them talks.
        log = print if distributed.is_main_process() else (lambda s: None)
        if args.confidence is not None:
            recipe = recipe.replace(budget=dataclasses.replace(recipe.budget, confidence=args.confidence))
        report = run_recipe(recipe, out, overwrite=args.overwrite, max_accuracy_drop=args.max_accuracy_drop, log=log)
    if not distributed.is_main_process():
        return 0
    return finish(report, out)


def _validate(path: Path) -> int:
    """``--validate-only``: the recipe, its factories and files, the data, and the layer names it uses (the model
    is built but not trained)."""
    recipe = load_recipe(path)
    build_model(recipe, build_data(recipe), check=True, train=False)
    print(f"{path}: valid ({len(recipe.stages)} stage(s): {', '.join(s.name for s in recipe.stages)}); "
          "model, data and layer names checked")
    return 0


def _x(ratio: float | None, spec: str) -> str:
    # a ratio is None where the compressed side counts zero (e.g. MACs of int8 kernels the counter cannot see)
    return "n/a" if ratio is None else f"{ratio:{spec}}x"


def finish(report: dict[str, Any], out: str | Path) -> int:
    """Print the few lines a command ends with (metric, size, MACs and latency against the baseline) and return
    its exit code: ``EXIT_BUDGET_MISSED`` when the result misses the budget, else 0."""
    r = report["ratios"]
    lat = r["latency"]
    speed = f"latency {lat:.2f}x lower" if lat >= 1 else f"latency {1 / lat:.2f}x HIGHER"
    print(f"\n{report.get('metric', 'accuracy')} {report['baseline']['accuracy']:.4f} -> "
          f"{report['compressed']['accuracy']:.4f} on test (drop {100 * report['accuracy_drop']:.2f} points)")
    print(f"bytes on disk {report['baseline']['size_bytes']:,} -> {report['compressed']['size_bytes']:,} "
          f"({_x(r['size'], '.2f')} smaller); non-zero params {_x(r['nonzero_params'], '.1f')} fewer; MACs "
          f"{_x(r['macs'], '.2f')} fewer; {speed} (measured side by side at batch {report.get('recipe', {}).get('example_batch', 1)})")
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
    path = _recipe_arg(args)
    if args.validate_only:
        return _validate(path)
    recipe = load_recipe(path)
    out = Path(args.out or _default_out(path, "sensitivity"))
    if (out / "sensitivity.json").exists() and not args.overwrite:
        raise TorchslimError(f"{out / 'sensitivity.json'} exists; pass --overwrite to replace it")
    data = build_data(recipe)
    model, _ = baseline_model(recipe, data)
    # Each finished point is kept there, so that a killed scan resumes where it stopped.
    progress = writable_folder(out) / ".sensitivity-progress.jsonl"
    result = sensitivity(model, data.val, sparsities=_floats(args.sparsities),
                         bits=[int(b) for b in _floats(args.bits)], layers=args.layers or None,
                         metric=None if recipe.metric == "accuracy" else metric_function(recipe),
                         metric_name=recipe.metric, resume=progress)
    paths = result.write(out)
    progress.unlink(missing_ok=True)
    print(result.to_markdown())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _search(args: argparse.Namespace) -> int:
    path = _recipe_arg(args)
    if args.validate_only:
        return _validate(path)
    recipe = load_recipe(path)
    out = args.out or _default_out(path, "search")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetMissedWarning)
        options = SearchOptions(max_accuracy_drop=args.max_accuracy_drop, confidence=args.confidence,
                                objective=args.objective,
                                strategy=args.strategy, trials=args.trials, storage=args.storage,
                                study_name=args.study_name, workers=args.workers, worker_only=args.worker,
                                overwrite=args.overwrite, max_latency_ratio=args.max_latency_ratio)
        result = search(recipe, out, options)
    if args.worker:
        print(f"worker done: {result.n_complete} complete trial(s) in the study")
        return 0
    return finish(result.report, out)


EXIT_CODES = ("exit codes: 0 done; 2 bad input or another torchslim error (the message names the file, line and "
              "key); 3 the result misses the accuracy budget (the outputs are written and say so at the top)")


def epilog(*examples: str) -> str:
    """A command's ``--help`` epilog: its examples, then the exit codes."""
    return "examples:\n" + "\n".join(f"  {e}" for e in examples) + "\n\n" + EXIT_CODES


def command_parser(subparsers: argparse._SubParsersAction, name: str, help: str, *examples: str
                   ) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` shows every default, the examples and the exit codes."""

    class Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str:
            text = action.help or ""
            # Options whose default is the recipe's say so in their own words; flags default to off.
            if "default" in text or action.default in (None, False, argparse.SUPPRESS):
                return text
            return text + " (default: %(default)s)"

    return subparsers.add_parser(name, help=help, description=help, epilog=epilog(*examples),
                                 formatter_class=Formatter)


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """``--threads N``: compute threads per process (default: the cores shared among worker processes)."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads per process, worker processes included (default: cores / workers; "
                             "env TORCHSLIM_THREADS)")


def _budget_options(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--max-accuracy-drop", type=float, metavar="DROP",
                   help=f"{where}: the most the metric may fall below the baseline on the validation split, as a "
                        "fraction (0.01 = 1 point; default: the recipe's budget.max_accuracy_drop)")
    p.add_argument("--confidence", type=float, metavar="P",
                   help="a result is within budget when the one-sided upper confidence bound of its drop (sampling "
                        "error of the validation split) is; default: the recipe's budget.confidence, 0.9")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``compress``, ``sensitivity`` and ``search`` to the ``torchslim`` command line."""
    def common(p: argparse.ArgumentParser, command: str) -> None:
        p.add_argument("recipe", nargs="?", help="recipe YAML file")
        p.add_argument("--recipe", dest="recipe_opt", metavar="RECIPE",
                       help="recipe YAML file (same as the positional)")
        p.add_argument("--out", help=f"output folder (default: out/<recipe file name>-{command})")
        p.add_argument("--overwrite", action="store_true", help="replace outputs already in --out")
        p.add_argument("--validate-only", action="store_true",
                       help="check the recipe, its files and layer names (the model is built, not trained) and stop")
        add_threads_option(p)

    c = command_parser(subparsers, "compress", "run a recipe's stages with guard rails and write the report",
                       "torchslim compress recipes/lenet5_prune_quantize_finetune.yaml --out out/joint",
                       "torchslim compress my_recipe.yaml --validate-only")
    common(c, "compress")
    _budget_options(c, "budget of the guard rails")
    c.set_defaults(func=_compress)

    s = command_parser(subparsers, "sensitivity", "per-layer metric against sparsity and bit width (one-shot, "
                       "validation split)",
                       "torchslim sensitivity recipes/lenet5_prune_quantize_finetune.yaml --out out/sens",
                       "torchslim sensitivity my_recipe.yaml --layers 'fc*' --sparsities 0.5,0.9 --bits 8,4")
    common(s, "sensitivity")
    s.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95,0.98",
                   help="comma-separated sparsities to try per layer")
    s.add_argument("--bits", default="8,6,4,3,2", help="comma-separated weight bit widths to try per layer")
    s.add_argument("--layers", nargs="*", metavar="PATTERN",
                   help="fnmatch patterns of the layers to scan (default: every Linear/Conv)")
    s.set_defaults(func=_sensitivity)

    q = command_parser(subparsers, "search", "per-layer rates minimising size, latency or MACs under an accuracy "
                       "budget on the validation split",
                       "torchslim search --recipe recipes/lenet5_prune_quantize_finetune.yaml "
                       "--max-accuracy-drop 0.01 --out out/search",
                       "torchslim search my_recipe.yaml --strategy optuna --trials 40 --workers 2 --objective latency")
    common(q, "search")
    _budget_options(q, "the search's budget")
    q.add_argument("--objective", choices=("size", "latency", "macs"),
                   help="what to minimise: size = bytes of the saved checkpoint, latency = measured at batch 1, "
                        "macs = counted (default: the recipe's search.objective, size)")
    q.add_argument("--max-latency-ratio", type=float, metavar="R",
                   help="latency ceiling: candidates slower than R x the baseline (timed side by side) are "
                        "infeasible (default: the recipe's search.max_latency_ratio, none)")
    q.add_argument("--strategy", choices=("fast", "optuna"),
                   help="fast = one-shot sensitivity then bisection (6-8 evaluations); optuna = multi-objective "
                        "TPE over --trials (default: the recipe's search.strategy, fast)")
    q.add_argument("--trials", type=int, metavar="N",
                   help="trials of the optuna strategy, all workers together (default: the recipe's search.trials, "
                        "30)")
    q.add_argument("--storage", metavar="URL", help="Optuna storage URL (default: sqlite:///OUT/search.db)")
    q.add_argument("--study-name", help="study name in the storage (default: derived from the recipe and objective)")
    q.add_argument("--workers", type=int, metavar="N",
                   help="worker processes on this machine, optuna strategy (default: the recipe's search.workers, 1)")
    q.add_argument("--worker", action="store_true",
                   help="only run trials against --storage (another machine's search writes the report)")
    q.set_defaults(func=_search)
