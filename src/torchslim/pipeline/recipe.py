"""Recipes: one YAML file names the model, the data, the metric and the ordered compression stages.

.. code-block:: yaml

    model: {builtin: lenet5, train: {epochs: 12, lr: 2.0e-3}}   # or {factory: "pkg.module:build", weights: w.pt}
    data: {builtin: digits}                                       # or {factory: "pkg.module:loaders"}
    metric: accuracy                                              # or "pkg.module:fn", fn(model, loader) -> float
    budget: {max_accuracy_drop: 0.01}
    stages:
      - {name: prune, type: UnstructuredPruning, sparsity: 0.9}
      - {name: finetune, type: Finetune, train: {epochs: 2}}

Each stage maps one-to-one onto a config of the Python API: ``type`` is the config class name and the other keys
are its fields (nested configs such as ``schedule`` or ``train`` are nested mappings). Everything is validated
before any work starts, and errors point at the line: ``recipe.yaml:12: stages[1].sparsity: must satisfy
0 <= sparsity < 1, got 1.2``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import hashlib
import importlib
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import yaml
from torch import nn

from ..core.config import Config, config_types
from ..core.errors import ConfigError, DataError, TorchslimError
from ..training.train import TrainConfig

__all__ = ["Recipe", "ModelSpec", "DataSpec", "StageSpec", "BudgetSpec", "GuardSpec", "SearchSpec", "RecipeError",
           "load_recipe", "parse_recipe", "recipe_from_dict", "check_against_model", "import_callable",
           "build_model", "build_data", "metric_function", "save_kwargs", "reseed", "stage_families", "stage_types",
           "load_techniques"]

Loc = tuple  # a location in the recipe: ("stages", 1, "sparsity")

# Stage keys that are pipeline options, not config fields.
STAGE_KEYS = ("name", "type", "check", "search")
# Technique packages whose configs become stage types once imported.
_TECHNIQUES = ("torchslim.pruning", "torchslim.quantization", "torchslim.distillation", "torchslim.lowrank")
OBJECTIVES = ("size", "latency", "macs")


class RecipeError(ConfigError):
    """A recipe is malformed; ``problems`` holds ``(line, path, message)`` for every error found."""

    def __init__(self, source: str, problems: list[tuple[int | None, str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = []
        for line, path, message in self.problems:
            where = f"{source}:{line}" if line else source
            lines.append(f"{where}: {path}: {message}" if path else f"{where}: {message}")
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# The recipe's parts


def _check_spec(name: str, value: str) -> None:
    if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", value):
        raise ConfigError(f"{name} must look like 'pkg.module:function', got {value!r}")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


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
    ``name`` is accepted as another word for ``builtin``.
    """

    builtin: str | None = None
    factory: str | None = None
    checkpoint: str | None = None
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    weights: str | None = None
    train: TrainConfig | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        _alias_name(self)
        chosen = [k for k in ("builtin", "factory", "checkpoint") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise ConfigError(f"set exactly one of builtin, factory or checkpoint (got {chosen or 'none'})")
        if self.builtin is not None:
            from ..models import MODELS

            _check_choice("builtin", self.builtin, tuple(sorted(MODELS)))
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
            _check_choice("builtin", self.builtin, ("digits", "mnist"))
        if self.factory is not None:
            _check_spec("factory", self.factory)


@dataclasses.dataclass(frozen=True)
class BudgetSpec:
    """``max_accuracy_drop``: the most the metric may fall below the baseline (in the metric's units, e.g.
    0.01 = one accuracy point), measured on the validation split. None: no budget."""

    max_accuracy_drop: float | None = None

    def __post_init__(self) -> None:
        v = self.max_accuracy_drop
        if v is not None and not 0 <= v < 1:
            raise ConfigError(f"max_accuracy_drop must satisfy 0 <= max_accuracy_drop < 1, got {v}")


@dataclasses.dataclass(frozen=True)
class GuardSpec:
    """What happens when a stage breaks the budget: ``retry`` it up to ``retries`` times with its rates moved
    towards no compression by ``milder`` each time, then roll it back; ``rollback`` at once; ``warn`` (keep it,
    loudly) or ``fail`` (stop with an error)."""

    policy: str = "retry"
    retries: int = 2
    milder: float = 0.5

    def __post_init__(self) -> None:
        _check_choice("policy", self.policy, ("retry", "rollback", "warn", "fail"))
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        if not 0 < self.milder < 1:
            raise ConfigError(f"milder must satisfy 0 < milder < 1, got {self.milder}")


@dataclasses.dataclass(frozen=True)
class SearchSpec:
    """Defaults for ``torchslim search`` (command-line options override them).

    ``objective``: ``size`` (bytes of the saved checkpoint), ``latency`` (measured) or ``macs`` (counted);
    ``strategy``: ``fast`` (sensitivity-guided allocation + bisection) or ``optuna`` (multi-objective, Pareto
    front); ``trials``: evaluations for ``optuna``; ``storage``: an Optuna storage URL (default: SQLite file in
    the output folder); ``workers``: processes evaluating trials in parallel (``optuna`` strategy).
    """

    objective: str = "size"
    strategy: str = "fast"
    trials: int = 30
    storage: str | None = None
    study_name: str | None = None
    workers: int = 1

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_choice("strategy", self.strategy, ("fast", "optuna"))
        if self.trials < 1:
            raise ConfigError(f"trials must be >= 1, got {self.trials}")
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {self.workers}")


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
        if self.metric != "accuracy":
            _check_spec("metric", self.metric)
        if self.example_batch < 1:
            raise ConfigError(f"example_batch must be >= 1, got {self.example_batch}")

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
        return _line_of(self.lines, path)

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


# ----------------------------------------------------------------------------------------------
# YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader reading ``1e-3`` as a float (YAML 1.2), not as the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _walk_nodes(node: yaml.Node, path: Loc, lines: dict, problems: list) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            if key == "<<":  # merge keys: the merged entries keep their anchor's lines
                continue
            line = key_node.start_mark.line + 1
            if key in seen:
                problems.append((line, _fmt_path(path + (key,)), f"duplicate key {key!r} (first at line {seen[key]})"))
            seen[key] = line
            lines[path + (key,)] = line
            _walk_nodes(value_node, path + (key,), lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[path + (i,)] = item.start_mark.line + 1
            _walk_nodes(item, path + (i,), lines, problems)


def _line_of(lines: Mapping[Loc, int], path: Loc) -> int | None:
    for n in range(len(path), -1, -1):
        if path[:n] in lines:
            return lines[path[:n]]
    return None


class _Key(str):
    """A mapping key that names a layer: shown as ``['layers.0']`` rather than as a field."""


def _fmt_path(path: Loc) -> str:
    out = ""
    for p in path:
        if isinstance(p, _Key):
            out += f"[{str(p)!r}]"
        elif isinstance(p, int):
            out += f"[{p}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", str(p)):
            out += f".{p}" if out else str(p)
        else:
            out += f"[{str(p)!r}]"
    return out


# ----------------------------------------------------------------------------------------------
# Type checking against dataclass annotations


class _Mismatch(Exception):
    pass


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_describe(args[0])}" if len(args) == 2 and args[1] is Ellipsis else \
            f"a list [{', '.join(_describe(a) for a in args)}]"
    if origin is dict:
        return f"a mapping {{{_describe(args[0])}: {_describe(args[1])}}}" if args else "a mapping"
    if origin is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if hint is Any:
        return "anything"
    if isinstance(hint, type) and issubclass(hint, Config):
        return f"a mapping ({hint.__name__})"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _conform(value: Any, hint: Any) -> Any:
    """``value`` checked against the annotation ``hint`` (lists become tuples where a tuple is expected)."""
    if hint is Any or hint is None:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            try:
                return _conform(value, a)
            except _Mismatch:
                continue
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_conform(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch
        return tuple(_conform(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_conform(v, args[0]) for v in value] if args else list(value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        if not args:
            return dict(value)
        key_hint, value_hint = args
        # Layer names such as Sequential's "0" parse as YAML integers.
        return {(str(k) if key_hint is str and isinstance(k, int) else _conform(k, key_hint)): _conform(v, value_hint)
                for k, v in value.items()}
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise _Mismatch
    return value


def _config_class_in(hint: Any) -> type[Config] | None:
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and issubclass(arg, Config):
            return arg
    return None


def _split_message(msg: str, fields: set[str]) -> tuple[Loc, str]:
    """Map a validate() message such as ``"sparsity['fc1'] must ..."`` to (("sparsity", "fc1"), "must ...")."""
    m = re.match(r"^([A-Za-z_][\w.]*)((?:\[[^\]]*\])*)\s+(.*)$", msg, re.S)
    if not m:
        return (), msg
    name = m.group(1).split(".")[-1]
    if name not in fields:
        return (), msg
    keys = tuple(_Key(k.strip("'\"")) for k in re.findall(r"\[([^\]]*)\]", m.group(2)))
    rest = m.group(3)
    return (name, *keys), (rest if re.match(r"[a-z]", rest) else msg)


class _Context:
    def __init__(self, source: str, lines: Mapping[Loc, int]):
        self.source = source
        self.lines = lines
        self.problems: list[tuple[int | None, str, str]] = []

    def add(self, path: Loc, message: str) -> None:
        self.problems.append((_line_of(self.lines, path), _fmt_path(path), message))

    def raise_if_any(self) -> None:
        if self.problems:
            raise RecipeError(self.source, sorted(self.problems, key=lambda p: (p[0] or 0)))


def _build(cls: type, data: Any, path: Loc, ctx: _Context, skip: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from mapping ``data``, recording every problem with its location; None on error."""
    if not isinstance(data, dict):
        ctx.add(path, f"expected a mapping of {cls.__name__} fields, got {type(data).__name__} {data!r}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    before = len(ctx.problems)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key in skip or (key == "version" and issubclass(cls, Config)):
            continue
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            ctx.add(path + (key,), f"unknown key {key!r} for {cls.__name__}{hint}; allowed: {sorted(fields)}")
            continue
        hint = hints.get(key, Any)
        sub_cls = _config_class_in(hint)
        if isinstance(value, dict) and ("type" in value or sub_cls is not None):
            name = value.get("type", sub_cls.__name__ if sub_cls else None)
            chosen = config_types().get(name)
            if chosen is None:
                ctx.add(path + (key, "type"), f"unknown config type {name!r}")
                continue
            if sub_cls is not None and not issubclass(chosen, sub_cls):
                ctx.add(path + (key, "type"), f"expected a {sub_cls.__name__}, got {name!r}")
                continue
            kwargs[key] = _build(chosen, value, path + (key,), ctx, skip=("type",))
            continue
        try:
            kwargs[key] = _conform(value, hint)
        except _Mismatch:
            ctx.add(path + (key,), f"expected {_describe(hint)}, got {type(value).__name__} {value!r}")
    if len(ctx.problems) > before:
        return None
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        sub, message = _split_message(str(exc), set(fields))
        ctx.add(path + sub, message)
    except TypeError as exc:
        ctx.add(path, str(exc))
    return None


# ----------------------------------------------------------------------------------------------
# Parsing


def load_techniques() -> None:
    """Import the technique packages and their modules so that every config is a known type (a technique whose
    optional third-party dependency is missing stays unknown)."""
    import pkgutil

    for name in _TECHNIQUES:
        try:
            pkg = importlib.import_module(name)
            for info in pkgutil.iter_modules(getattr(pkg, "__path__", [])):
                importlib.import_module(f"{name}.{info.name}")
        except ImportError as exc:
            if (exc.name or "").startswith("torchslim"):
                raise


def stage_types() -> list[str]:
    """Config class names that the pipeline can apply as stages."""
    from ..techniques import BUILTIN

    return sorted(BUILTIN.names())


def load_recipe(path: str | Path, *, resolve: bool = True) -> Recipe:
    """Read and validate the recipe at ``path``. ``resolve`` also imports its factories and checks its files."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    return parse_recipe(text, source=str(path), base_dir=path.parent, resolve=resolve)


def parse_recipe(text: str, source: str = "<recipe>", base_dir: str | Path = ".", *, resolve: bool = True) -> Recipe:
    """Validate recipe YAML ``text``; every error is reported with its line in ``source``."""
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else None
        msg = f"invalid YAML: {getattr(exc, 'problem', None) or exc}"
        context, cmark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
        if context:
            msg += f" ({context}" + (f" that starts at line {cmark.line + 1})" if cmark is not None else ")")
        raise RecipeError(source, [(line, "", msg)]) from None
    lines: dict[Loc, int] = {}
    problems: list = []
    if node is not None:
        _walk_nodes(node, (), lines, problems)
    if problems:
        raise RecipeError(source, problems)
    return recipe_from_dict(data, source=source, base_dir=base_dir, lines=lines, resolve=resolve)


def recipe_from_dict(data: Any, source: str = "<recipe>", base_dir: str | Path = ".", *,
                     lines: Mapping[Loc, int] | None = None, resolve: bool = True) -> Recipe:
    """Validate a recipe given as plain data (what :meth:`Recipe.to_dict` or ``yaml.safe_load`` returns)."""
    ctx = _Context(source, lines or {})
    if not isinstance(data, dict):
        ctx.add((), f"a recipe is a mapping with model, data and stages; got {type(data).__name__}")
        ctx.raise_if_any()
    load_techniques()
    top = {f.name for f in dataclasses.fields(Recipe) if f.name not in ("source", "base_dir", "lines")}
    for key in data:
        if key not in top:
            close = difflib.get_close_matches(str(key), sorted(top), n=1)
            ctx.add((key,), f"unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; allowed: {sorted(top)}")
    if "stages" not in data:
        ctx.add((), "missing required key 'stages'")
    kwargs: dict[str, Any] = {}
    for key, cls in (("model", ModelSpec), ("data", DataSpec), ("budget", BudgetSpec), ("guard", GuardSpec),
                     ("search", SearchSpec)):
        if key in data:
            kwargs[key] = _build(cls, data[key], (key,), ctx)
    for key, hint in (("metric", str), ("seed", int), ("example_batch", int), ("name", str)):
        if key in data:
            try:
                kwargs[key] = _conform(data[key], hint)
            except _Mismatch:
                ctx.add((key,), f"expected {_describe(hint)}, got {type(data[key]).__name__} {data[key]!r}")
    if "stages" in data:
        kwargs["stages"] = _parse_stages(data["stages"], ctx)
    ctx.raise_if_any()
    try:
        recipe = Recipe(**kwargs, source=source, base_dir=str(base_dir), lines=dict(lines or {}))
    except ConfigError as exc:
        sub, message = _split_message(str(exc), top)
        ctx.add(sub, message)
        ctx.raise_if_any()
        raise
    _check_stage_order(recipe, ctx)
    if resolve:
        _resolve(recipe, ctx)
    ctx.raise_if_any()
    return recipe


def _parse_stages(items: Any, ctx: _Context) -> tuple[StageSpec, ...] | None:
    if not isinstance(items, list) or not items:
        ctx.add(("stages",), "expected a non-empty list of stages, e.g. "
                             "[{name: prune, type: UnstructuredPruning, sparsity: 0.9}]")
        return None
    known = stage_types()
    types_ = config_types()
    stages = []
    for i, item in enumerate(items):
        path = ("stages", i)
        if not isinstance(item, dict):
            ctx.add(path, f"a stage is a mapping with a 'type' key, got {type(item).__name__} {item!r}")
            continue
        type_name = item.get("type")
        if type_name is None:
            ctx.add(path, f"missing 'type'; stage types: {known}")
            continue
        if not isinstance(type_name, str) or type_name not in known:
            close = difflib.get_close_matches(str(type_name), known, n=1)
            what = ("is a config but not a pipeline stage" if type_name in types_ else "is not a known stage type")
            ctx.add(path + ("type",), f"{type_name!r} {what}" + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; stage types: {known}")
            continue
        cls = types_[type_name]
        clash = [k for k in STAGE_KEYS if k not in ("type",) and k in {f.name for f in dataclasses.fields(cls)}]
        if clash:
            raise TorchslimError(f"{type_name} declares field(s) {clash} that recipes reserve for stage options; "
                                 "rename the field")
        name = item.get("name", type_name.lower() if i == 0 else f"{type_name.lower()}{i}")
        if not isinstance(name, str) or not name:
            ctx.add(path + ("name",), f"expected a non-empty string, got {name!r}")
        check = item.get("check", True)
        if not isinstance(check, bool):
            ctx.add(path + ("check",), f"expected true/false, got {check!r}")
        search = item.get("search", True)
        if isinstance(search, list) and all(isinstance(s, str) for s in search):
            fields = {f.name for f in dataclasses.fields(cls)}
            bad = [s for s in search if s not in fields]
            if bad:
                ctx.add(path + ("search",), f"{bad} are not fields of {type_name}; fields: {sorted(fields)}")
            search = tuple(search)
        elif not isinstance(search, bool):
            ctx.add(path + ("search",), f"expected true/false or a list of field names, got {search!r}")
        config = _build(cls, item, path, ctx, skip=STAGE_KEYS)
        if config is not None:
            stages.append(StageSpec(name=name, config=config, check=check, search=search))
    return tuple(stages)


def stage_families(config: Config) -> str:
    """A stage's technique family: unstructured, structured, lowrank, quantize, distill, finetune or other."""
    name, module = type(config).__name__, type(config).__module__
    if name == "UnstructuredPruning":
        return "unstructured"
    if name == "StructuredPruning":
        return "structured"
    if module.startswith("torchslim.lowrank"):
        return "lowrank"
    if module.startswith("torchslim.quantization"):
        return "quantize"
    if module.startswith("torchslim.distillation"):
        return "distill"
    if name == "Finetune":
        return "finetune"
    return "other"


# (earlier family, later family, why the order contradicts itself)
_ORDER_RULES = (
    ("unstructured", "structured", "structured pruning refuses layers that carry unstructured masks; "
                                   "put StructuredPruning before UnstructuredPruning"),
    ("unstructured", "lowrank", "decomposing replaces the masked weights by dense factors, losing the zeros; "
                                "decompose before pruning"),
    ("quantize", "unstructured", "pruning after quantization breaks the quantized weights; quantize last"),
    ("quantize", "structured", "pruning after quantization breaks the quantized weights; quantize last"),
    ("quantize", "lowrank", "decomposing after quantization breaks the quantized weights; quantize last"),
)


def _check_stage_order(recipe: Recipe, ctx: _Context) -> None:
    names = [s.name for s in recipe.stages]
    for i, n in enumerate(names):
        if n in names[:i]:
            ctx.add(("stages", i, "name"), f"duplicate stage name {n!r}; names label the report's rows")
    families = [stage_families(s.config) for s in recipe.stages]
    for j, later in enumerate(families):
        for i in range(j):
            for earlier, after, why in _ORDER_RULES:
                if families[i] == earlier and later == after:
                    ctx.add(("stages", j, "type"), f"{type(recipe.stages[j].config).__name__} cannot follow "
                            f"{type(recipe.stages[i].config).__name__} (stages[{i}]): {why}")


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """Let a factory module sit next to the recipe, without leaving the folder on sys.path afterwards."""
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_callable(spec: str, base_dir: str | Path = ".") -> Callable:
    """Import ``"pkg.module:function"`` (``base_dir`` is searched first); errors say what is missing."""
    module_name, _, qual = spec.partition(":")
    try:
        with _on_path(Path(base_dir)):
            obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} ({exc}); put {module_name.split('.')[0]}.py next "
                          "to the recipe or install the package that provides it") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for attr in qual.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"module {module_name!r} has no attribute {qual!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"{spec} is not callable")
    return obj


def _resolve(recipe: Recipe, ctx: _Context) -> None:
    """Import factories and check files now, so that no work starts on a recipe that cannot finish."""
    for path, spec in ((("model", "factory"), recipe.model and recipe.model.factory),
                       (("data", "factory"), recipe.data and recipe.data.factory),
                       (("metric",), None if recipe.metric == "accuracy" else recipe.metric)):
        if spec is not None:
            try:
                import_callable(spec, recipe.base_dir)
            except ConfigError as exc:
                ctx.add(path, str(exc))
    for key in ("weights", "checkpoint"):
        value = getattr(recipe.model, key, None)
        if value is not None and not recipe.resolve_path(value).is_file():
            ctx.add(("model", key), f"file not found: {recipe.resolve_path(value)}")


# ----------------------------------------------------------------------------------------------
# Building what the recipe names


def build_data(recipe: Recipe):
    """The recipe's :class:`~torchslim.data.Splits` (train / val / test)."""
    from ..data import Splits, load_dataset

    spec = recipe.data
    if spec is None:
        raise ConfigError(f"{recipe.source} names no data: add a data: section (builtin or factory), or pass "
                          "data= (a torchslim.data.Splits) from Python")
    if spec.builtin is not None:
        return load_dataset(spec.builtin, **spec.kwargs)
    fn = import_callable(spec.factory, recipe.base_dir)
    try:
        out = fn(**spec.kwargs)
    except TorchslimError:
        raise
    except Exception as exc:
        raise DataError(f"data factory {spec.factory}(**{spec.kwargs!r}) failed: {type(exc).__name__}: {exc}") from None
    if isinstance(out, Splits):
        return out
    if isinstance(out, Mapping) and all(k in out for k in ("train", "val", "test")):
        return Splits(name=spec.factory, train=out["train"], val=out["val"], test=out["test"],
                      num_classes=int(out.get("num_classes", 0)))
    raise DataError(f"data factory {spec.factory} returned {type(out).__name__}; return a torchslim.data.Splits or "
                    "a mapping with 'train', 'val' (held out from train) and 'test' loaders")


def build_model(recipe: Recipe, data=None, log: Callable[[str], None] = print, *, check: bool = False,
                train: bool = True) -> nn.Module:
    """The recipe's model with its weights (trained on ``data.train`` first when the recipe says ``train``,
    unless ``train`` is False).

    ``check`` runs :func:`check_against_model` before any training (it needs ``data`` for example inputs)."""
    import torch

    from ..export.checkpoint import load
    from ..models import build_model as build_builtin
    from ..training.train import train as train_model

    spec = recipe.model
    if spec is None:
        raise ConfigError(f"{recipe.source} names no model: add a model: section (builtin, factory or "
                          "checkpoint), or pass model= (a trained nn.Module) from Python")
    # Initial weights and training are reproducible from the recipe's seed.
    if data is not None:
        reseed(data, recipe.seed)
    else:
        torch.manual_seed(recipe.seed)
    if spec.checkpoint is not None:
        model = load(recipe.resolve_path(spec.checkpoint))
    elif spec.builtin is not None:
        model = build_builtin(spec.builtin, **spec.kwargs)
    else:
        fn = import_callable(spec.factory, recipe.base_dir)
        try:
            model = fn(**spec.kwargs)
        except Exception as exc:
            raise ConfigError(f"model factory {spec.factory}(**{spec.kwargs!r}) failed: "
                              f"{type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model factory {spec.factory} returned {type(model).__name__}, not an nn.Module")
    if spec.weights is not None:
        _load_weights(model, recipe.resolve_path(spec.weights))
    if check and data is not None:
        check_against_model(recipe, model, data.example_inputs(recipe.example_batch))
    if spec.train is not None and train:
        if data is None:
            raise ConfigError("model.train needs the recipe's data; pass data=")
        log(f"training the {spec.builtin or spec.factory or 'model'} model ({spec.train.epochs:g} epochs)")
        train_model(model, data.train, spec.train, val_loader=data.val)
    return model.cpu().eval()


def _load_weights(model: nn.Module, path: Path) -> None:
    import torch

    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ConfigError(f"weights {path} do not fit the model: {exc}") from None


def metric_function(recipe: Recipe) -> Callable[[nn.Module, Any], float]:
    """``metric(model, loader) -> float`` (higher is better): top-1 accuracy or the recipe's function."""
    from ..metrics import evaluate

    if recipe.metric == "accuracy":
        return evaluate
    fn = import_callable(recipe.metric, recipe.base_dir)

    def metric(model: nn.Module, loader) -> float:
        return float(fn(model, loader))

    return metric


def reseed(data, seed: int) -> None:
    """Seed torch and the training loader's shuffling, so that a run depends on the seed only (not on what
    used the data before in this process)."""
    import torch

    torch.manual_seed(seed)
    loader = data.train
    gens = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    for i, g in enumerate(gens):
        if isinstance(g, torch.Generator) and g not in gens[:i]:
            g.manual_seed(seed)


def save_kwargs(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    """Arguments that let ``torchslim.save`` record how to rebuild a factory model without ``init_kwargs``."""
    if recipe.model is not None and recipe.model.factory is not None and \
            not isinstance(getattr(model, "init_kwargs", None), dict):
        return {"factory": recipe.model.factory, "factory_kwargs": dict(recipe.model.kwargs)}
    return {}


def check_against_model(recipe: Recipe, model: nn.Module, example_inputs: tuple) -> None:
    """Check that per-layer entries (``sparsity: {fc1: 0.9}``...) name layers the model has, before any work."""
    from ..techniques import BUILTIN

    ctx = _Context(recipe.source, recipe.lines)
    for i, stage in enumerate(recipe.stages):
        space = BUILTIN.of(stage.config).search
        if space is None:
            continue
        if any(space_.renames_layers for space_ in
               (BUILTIN.of(s.config).search for s in recipe.stages[:i]) if space_ is not None):
            break  # layer names after a decomposition are those of the decomposed model
        for fs in space.fields:
            value = getattr(stage.config, fs.field)
            if not isinstance(value, dict):
                continue
            valid = fs.valid_keys(stage.config, model, example_inputs)
            for key in value:
                if key not in valid and not fnmatch.filter(valid, key):
                    close = difflib.get_close_matches(key, valid, n=1)
                    ctx.add(("stages", i, fs.field, _Key(key)), f"no layer {key!r} in the model for {fs.field}"
                            + (f" (did you mean {close[0]!r}?)" if close else "") + f"; layers: {valid}")
    ctx.raise_if_any()
