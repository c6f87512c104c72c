"""The main job: train LeNet-5 on the embedded digits data, search a joint prune -> quantize -> fine-tune recipe
for the smallest file within a one-point accuracy budget, and write the report."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable

from ..pipeline.commands import BudgetMissedWarning
from ..pipeline.recipe import parse_recipe
from ..search.api import search
from ..search.options import SearchOptions


def demo_recipe_text(quick: bool = False, seed: int = 0) -> str:
    """The demo's recipe (the report records it, so ``torchslim search`` can re-run it from there).

    Per-layer sparsity and per-layer weight-sharing bits are searched; ``quick`` trains less (for tests)."""
    # The search's own bar shows progress; a bar per short fine-tuning run would only add noise.
    steps = "epochs: 1, max_steps: 16" if quick else "epochs: 3"
    ft = f"{{{steps}, lr: 1.0e-3, progress: false}}"
    return f"""\
name: lenet5-digits-demo
seed: {seed}
model: {{builtin: lenet5, train: {{epochs: {5 if quick else 10}, lr: 2.0e-3}}}}
data: {{builtin: digits, kwargs: {{val_fraction: 0.5}}}}
metric: accuracy
budget: {{max_accuracy_drop: 0.01}}
search: {{objective: size, strategy: fast}}
stages:
  - {{name: prune, type: UnstructuredPruning, sparsity: 0.9, check: false,
     schedule: {{kind: oneshot, finetune: {ft}}}}}
  - {{name: quantize, type: WeightSharing, bits: 5, check: false}}
  - {{name: finetune, type: Finetune, train: {ft}}}
"""


def run_demo(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False, quick: bool = False,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, search, save and report (report.json, report.md, pareto.png, accuracy_vs_size.png, model.slim);
    returns the report. A missed budget is written to the report (``report["budget"]["met"]``)."""
    out = Path(out_dir)
    recipe = parse_recipe(demo_recipe_text(quick, seed), source="<demo recipe>")
    db = out / "search.db"
    if overwrite and db.exists():
        db.unlink()  # a fresh demo, not a resumed one
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BudgetMissedWarning)  # the caller reads report["budget"]
        result = search(recipe, out, SearchOptions(overwrite=overwrite), log=log)
    log(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return result.report
