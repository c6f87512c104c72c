"""The recipe's parts: frozen dataclasses, each validating its own fields (:class:`Recipe` and the specs of its
model, data, budget, guard rails, search defaults and stages)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Mapping

from ...core.checks import check_choice, check_fraction, check_positive, check_range, did_you_mean
from ...core.config import Config
from ...core.errors import ConfigError
from ...models import MODELS
from ...training.train import TrainConfig
from .yaml_source import Loc, line

# Stage keys that are pipeline options, not config fields.
STAGE_KEYS = ("name", "type", "check", "search")
OBJECTIVES = ("size", "latency", "macs")
MAX_SEED = 2**31 - 1


def _check_spec(name: str, value: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        raise ConfigError(f"{name} must look like 'pkg.module:function', got {value!r}")


def _check_metric(value: str) -> None:
    if ":" not in value:
        raise ConfigError(f"metric must be 'accuracy' or a 'pkg.module:function' of (model, loader) -> float, got "
                          f"{value!r}{did_you_mean(value, ['accuracy'])}")
    _check_spec("metric", value)


def _alias_name(spec: Any) -> None:
    if spec.name is not None:
        if spec.builtin is not None and spec.builtin != spec.name:
            raise ConfigError(f"name ({spec.name!r}) is another word for builtin ({spec.builtin!r}); set one of them")
        object.__setattr__(spec, "builtin", spec.name)
        object.__setattr__(spec, "name", None)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model to compress: exactly one of ``builtin`` (a torchslim model name), ``factory``
    (``"pkg.module:function"`` called with ``kwargs``) or ``checkpoint`` (a ``.slim`` file).

    ``weights`` (a ``.pt``/``.pth`` state dict or a ``.safetensors`` file) is loaded into a built-in or factory
    model; ``train`` trains it on the recipe's training split first (for examples and demos without weights).
    Relative paths are relative to the recipe file; a factory module may sit next to the recipe.
    ``trusted`` names the code (``"pkg.module"`` or ``"pkg.module:callable"``) a ``checkpoint`` may call to
    rebuild its model besides torchslim's own (see ``torchslim.load``); the recipe's factory modules are
    trusted already. ``name`` is accepted as another word for ``builtin``.
    """

    builtin: str | None = None
    factory: str | None = None
    checkpoint: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    train: TrainConfig | None = None
    name: str | None = None
    trusted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _alias_name(self)
        chosen = [k for k in ("builtin", "factory", "checkpoint") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(f"set exactly one of builtin, factory or checkpoint (got {chosen or 'none'})")
        if self.builtin is not None:
            check_choice("builtin", self.builtin, tuple(sorted(MODELS)))
        if self.factory is not None:
            _check_spec("factory", self.factory)
        if self.checkpoint is not None and (self.weights is not None or self.kwargs):
            raise ConfigError("weights/kwargs do not apply to a checkpoint, which records its own architecture")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The data: ``builtin`` (``digits`` or ``mnist``) or ``factory`` (``"pkg.module:function"`` returning a
    :class:`~torchslim.data.Splits` or a mapping with ``train``, ``val`` and ``test`` loaders), with ``kwargs``.
    ``name`` is accepted as another word for ``builtin``."""

    builtin: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str | None = None

    def __post_init__(self) -> None:
        _alias_name(self)
        chosen = [k for k in ("builtin", "factory") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(f"set exactly one of builtin or factory (got {chosen or 'none'})")
        if self.builtin is not None:
            check_choice("builtin", self.builtin, ("digits", "mnist"))
        if self.factory is not None:
            _check_spec("factory", self.factory)


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """``max_accuracy_drop``: the most the metric may fall below the baseline (in the metric's units, e.g.
    0.01 = one accuracy point), measured on the validation split. None: no budget. ``confidence``: a result is
    within budget when the one-sided upper confidence bound of its drop (sampling error of the validation split,
    :mod:`torchslim.metrics.significance`) is at most ``max_accuracy_drop``."""

    max_accuracy_drop: float | None = None
    confidence: float = 0.9

    def __post_init__(self) -> None:
        if self.max_accuracy_drop is not None:
            check_fraction("max_accuracy_drop", self.max_accuracy_drop)
        check_range("confidence", self.confidence, 0.5, 0.999)


@dataclasses.dataclass(frozen=True)
class GuardSpec:
    """What happens when a stage breaks the budget: ``retry`` it up to ``retries`` times with its rates moved
    towards no compression by ``milder`` each time, then roll it back; ``rollback`` at once; ``warn`` (keep it,
    loudly) or ``fail`` (stop with an error)."""

    policy: str = "retry"
    retries: int = 2
    milder: float = 0.5

    def __post_init__(self) -> None:
        check_choice("policy", self.policy, ("retry", "rollback", "warn", "fail"))
        check_range("retries", self.retries, 0, 10**6, integer=True)
        check_fraction("milder", self.milder, allow_zero=False)


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """Defaults for ``torchslim search`` (command-line options override them).

    ``objective``: ``size`` (bytes of the saved checkpoint), ``latency`` (measured) or ``macs`` (counted);
    ``strategy``: ``fast`` (sensitivity-guided allocation + bisection) or ``optuna`` (multi-objective, Pareto
    front); ``trials``: evaluations for ``optuna``; ``storage``: an Optuna storage URL (default: SQLite file in
    the output folder); ``workers``: processes evaluating trials in parallel (``optuna`` strategy);
    ``max_latency_ratio``: candidates whose latency (inference form, measured side by side with the baseline's)
    exceeds this multiple of the baseline's are infeasible (e.g. 1.0: never slower); None: no ceiling.
    """

    objective: str = "size"
    strategy: str = "fast"
    trials: int = 30
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1
    max_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        if self.max_latency_ratio is not None:
            check_positive("max_latency_ratio", self.max_latency_ratio)
        check_choice("strategy", self.strategy, ("fast", "optuna"))
        check_positive("trials", self.trials, integer=True)
        check_positive("workers", self.workers, integer=True)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One pipeline stage: a technique ``config`` under a ``name``. ``check=False`` marks an intermediate
    result that a later stage recovers (the guard measures it but checks the budget only after the next checked
    stage); ``search`` is False to freeze the stage's fields, or the names of the fields the search may tune."""

    name: str
    config: Config
    check: bool = True
    search: bool | tuple[str, ...] = True

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        out.update(self.config.to_dict())
        out.pop("version", None)
        if not self.check:
            out["check"] = False
        if self.search is not True:
            out["search"] = list(self.search) if isinstance(self.search, tuple) else self.search
        return out


def _as_stage(stage: Any) -> StageSpec:
    if isinstance(stage, StageSpec):
        return stage
    if isinstance(stage, Config):
        return StageSpec(type(stage).__name__.lower(), stage)
    if isinstance(stage, tuple) and len(stage) == 2 and isinstance(stage[1], Config):
        return StageSpec(str(stage[0]), stage[1])
    raise ConfigError(f"stages: expected a StageSpec, a config or a (name, config) pair, got {stage!r}")


TOP_LEVEL_CHECKS = {
    "metric": lambda v: v == "accuracy" or _check_metric(v),
    "example_batch": lambda v: check_positive("example_batch", v, integer=True),
    # torch, numpy and Optuna's sampler all take this range, with room for one seed per search worker.
    "seed": lambda v: check_range("seed", v, 0, MAX_SEED, integer=True),
}
"""The checks of the recipe's own scalar fields (also run one by one while parsing, to list every error)."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe. Build one with :func:`load_recipe` / :func:`parse_recipe` (YAML) or directly.

    ``model`` and ``data`` may be left out when the model and the data are passed from Python
    (``torchslim.compress(recipe, out, model=..., data=...)``, likewise ``torchslim.search``). ``stages`` also
    takes configs, named after their type, or ``(name, config)`` pairs:
    ``Recipe(stages=[("prune", UnstructuredPruning(0.9)), ("finetune", Finetune(TrainConfig(epochs=2)))])``.
    """

    model: ModelSpec | None = None
    data: DataSpec | None = None
    stages: tuple[StageSpec, ...] = ()
    metric: str = "accuracy"
    seed: int = 0
    budget: BudgetSpec = BudgetSpec()
    guard: GuardSpec = GuardSpec()
    search: SearchSpec = SearchSpec()
    example_batch: int = 1
    name: str = "recipe"
    source: str = dataclasses.field(default="<recipe>", compare=False)
    base_dir: str = dataclasses.field(default=".", compare=False)
    lines: Mapping[Loc, int] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(_as_stage(s) for s in self.stages))
        if not self.stages:
            raise ConfigError("stages: a recipe needs at least one stage")
        for name, check in TOP_LEVEL_CHECKS.items():
            check(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML/JSON-ready) that :func:`recipe_from_dict` turns back into an equal recipe."""

        def plain(obj: Any) -> Any:
            out = {}
            for f in dataclasses.fields(obj):
                v = getattr(obj, f.name)
                if v is None or v == f.default or (f.default_factory is not dataclasses.MISSING and not v):
                    continue
                out[f.name] = v.to_dict() if isinstance(v, Config) else v
            return out

        d: dict[str, Any] = {"name": self.name}
        d.update({part: plain(getattr(self, part)) for part in ("model", "data") if getattr(self, part) is not None})
        d.update(metric=self.metric, seed=self.seed, example_batch=self.example_batch)
        for part in ("budget", "guard", "search"):
            d[part] = plain(getattr(self, part))
        d["stages"] = [s.to_dict() for s in self.stages]
        return json.loads(json.dumps(d))

    def key(self) -> str:
        """A short hash of what determines trial results (model, data, metric, seed, stages, example batch)."""
        d = self.to_dict()
        core = {k: d.get(k) for k in ("model", "data", "metric", "seed", "example_batch", "stages")}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def line(self, path: Loc) -> int | None:
        """Line of ``path`` (or of its nearest enclosing key) in the recipe file, if known."""
        return line(self.lines, path)

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path
