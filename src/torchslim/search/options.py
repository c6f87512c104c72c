"""The options of one search, checked when they are made; None takes the recipe's value."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ..core.checks import check_choice, check_fraction, check_positive, check_range
from ..core.errors import ConfigError
from ..pipeline.recipe import OBJECTIVES, Recipe

__all__ = ["SearchOptions", "STRATEGIES"]

STRATEGIES = ("fast", "optuna")


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """How to run :func:`torchslim.search`; each None takes the recipe's ``budget``/``search`` value.

    ``max_accuracy_drop``: the budget on the validation split (e.g. 0.005 = half a point); ``confidence``: a
    setting meets it when the upper confidence bound of its drop does (default the recipe's, 0.9); ``objective``:
    ``size``, ``latency`` or ``macs``; ``strategy``: ``fast`` or ``optuna``; ``trials``: evaluations of the
    ``optuna`` strategy (all workers together); ``storage``: an Optuna storage URL (default
    ``sqlite:///OUT/search.db``); ``study_name`` (default derived from the recipe and the objective);
    ``workers``: processes on this machine (``optuna`` strategy); ``worker_only``: only run trials of another
    process's study through a shared ``storage``; ``overwrite``: replace outputs already in the output folder;
    ``progress``: show progress bars; ``stop_after``: stop the fast strategy, as an interruption would
    (KeyboardInterrupt), after this many new evaluations (the study keeps them; run again to resume);
    ``max_latency_ratio``: a latency ceiling, as a multiple of the baseline's latency (both in their inference
    form, measured side by side on the recipe's example batch): slower candidates are infeasible."""

    max_accuracy_drop: float | None = None
    confidence: float | None = None
    objective: str | None = None
    strategy: str | None = None
    trials: int | None = None
    storage: str | None = None
    study_name: str | None = None
    workers: int | None = None
    worker_only: bool = False
    overwrite: bool = False
    progress: bool = True
    stop_after: int | None = None
    max_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None:
            check_fraction("max_accuracy_drop", self.max_accuracy_drop)
        if self.confidence is not None:
            check_range("confidence", self.confidence, 0.5, 0.999)
        if self.objective is not None:
            check_choice("objective", self.objective, OBJECTIVES)
        if self.strategy is not None:
            check_choice("strategy", self.strategy, STRATEGIES)
        if self.max_latency_ratio is not None:
            check_positive("max_latency_ratio", self.max_latency_ratio)
        for name in ("trials", "workers", "stop_after"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name), integer=True)
        for name in ("storage", "study_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"{name} must be a non-empty string or None, got {value!r}")
        for name in ("worker_only", "overwrite", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.strategy == "fast" and self.workers is not None and self.workers > 1:
            raise ConfigError("the fast strategy is a sequential bisection; use --strategy optuna for several "
                              "workers")

    def resolve(self, recipe: Recipe, out_dir: str | Path) -> "SearchOptions":
        """These options with every None filled in: from the recipe's ``budget`` and ``search`` sections, the
        storage defaulting to ``sqlite:///OUT/search.db`` and the study name to one derived from the recipe."""
        spec = recipe.search
        filled = {f: getattr(spec, f) if getattr(self, f) is None else getattr(self, f)
                  for f in ("objective", "strategy", "trials", "workers", "max_latency_ratio")}
        drop = recipe.budget.max_accuracy_drop if self.max_accuracy_drop is None else self.max_accuracy_drop
        if drop is None:
            raise ConfigError("search needs a budget: pass --max-accuracy-drop (SearchOptions(max_accuracy_drop=...)) "
                              "or set budget.max_accuracy_drop in the recipe")
        storage = self.storage or spec.storage or f"sqlite:///{(Path(out_dir) / 'search.db').resolve()}"
        name = self.study_name or spec.study_name or f"torchslim-{recipe.key()}-{filled['objective']}"
        confidence = recipe.budget.confidence if self.confidence is None else self.confidence
        return dataclasses.replace(self, max_accuracy_drop=drop, confidence=confidence, storage=storage, study_name=name, **filled)

