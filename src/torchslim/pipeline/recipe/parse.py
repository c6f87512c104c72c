"""Plain data -> :class:`Recipe`: every field is checked against its dataclass annotation and every problem is
collected, so that one error lists them all with their lines. Stage types resolve through a technique registry
(:data:`torchslim.techniques.BUILTIN` unless another is passed)."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Mapping

from ...core.checks import did_you_mean
from ...core.config import Config, config_types
from ...core.errors import ConfigError, TorchslimError
from ...core.technique import Techniques
from ...techniques import BUILTIN
from .build import import_callable
from .schema import STAGE_KEYS, TOP_LEVEL_CHECKS, BudgetSpec, DataSpec, GuardSpec, ModelSpec, Recipe, SearchSpec, StageSpec
from .yaml_source import Key, Loc, Problems, decode, load_yaml


def load_recipe(path: str | Path, *, resolve: bool = True, techniques: Techniques = BUILTIN) -> Recipe:
    """Read and validate the recipe at ``path``. ``resolve`` also imports its factories and checks its files;
    stage types are the names of ``techniques``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
    return parse_recipe(decode(raw, str(path)), source=str(path), base_dir=path.parent, resolve=resolve,
                        techniques=techniques)


def parse_recipe(text: str, source: str = "<recipe>", base_dir: str | Path = ".", *, resolve: bool = True,
                 techniques: Techniques = BUILTIN) -> Recipe:
    """Validate recipe YAML ``text``; every error is reported with its line in ``source``."""
    data, lines = load_yaml(text, source)
    return recipe_from_dict(data, source=source, base_dir=base_dir, lines=lines, resolve=resolve,
                            techniques=techniques)


def recipe_from_dict(data: Any, source: str = "<recipe>", base_dir: str | Path = ".", *,
                     lines: Mapping[Loc, int] | None = None, resolve: bool = True,
                     techniques: Techniques = BUILTIN) -> Recipe:
    """Validate a recipe given as plain data (what :meth:`Recipe.to_dict` or ``yaml.safe_load`` returns)."""
    ctx = Problems(source, lines or {})
    if not isinstance(data, dict):
        ctx.add((), f"a recipe is a mapping with model, data and stages; got {type(data).__name__}")
        ctx.raise_if_any()
    top = {f.name for f in dataclasses.fields(Recipe) if f.name not in ("source", "base_dir", "lines")}
    for key in data:
        if key not in top:
            ctx.add((key,), f"unknown key {key!r}{did_you_mean(str(key), sorted(top))}; allowed: {sorted(top)}")
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
                continue
            try:
                TOP_LEVEL_CHECKS.get(key, lambda v: None)(kwargs[key])
            except ConfigError as exc:
                ctx.add((key,), _split_message(str(exc), {key})[1])
    if "stages" in data:
        kwargs["stages"] = _parse_stages(data["stages"], ctx, techniques)
        _check_stages(data["stages"], kwargs["stages"], ctx, techniques)
    if resolve:  # imports and files, checked now so that their errors come with the others
        _resolve(kwargs.get("model"), kwargs.get("data"), kwargs.get("metric", "accuracy"), Path(base_dir), ctx)
    ctx.raise_if_any()
    try:
        recipe = Recipe(**kwargs, source=source, base_dir=str(base_dir), lines=dict(lines or {}))
    except ConfigError as exc:
        sub, message = _split_message(str(exc), top)
        ctx.add(sub, message)
        ctx.raise_if_any()
        raise
    ctx.raise_if_any()
    return recipe


def _parse_stages(items: Any, ctx: Problems, techniques: Techniques) -> tuple[StageSpec, ...] | None:
    if not isinstance(items, list) or not items:
        ctx.add(("stages",), "expected a non-empty list of stages, e.g. "
                             "[{name: prune, type: UnstructuredPruning, sparsity: 0.9}]")
        return None
    known = sorted(techniques.names())
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
        if not isinstance(type_name, str):
            ctx.add(path + ("type",), f"expected a stage type name (a string), got {type(type_name).__name__} "
                                      f"{type_name!r}; stage types: {known}")
            continue
        if type_name not in known:
            what = ("is a config but not a pipeline stage" if type_name in types_ else "is not a known stage type")
            ctx.add(path + ("type",), f"{type_name!r} {what}{did_you_mean(str(type_name), known)}; "
                                      f"stage types: {known}")
            continue
        cls = techniques.named(type_name).config
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


def _check_stages(items: Any, stages: tuple[StageSpec, ...] | None, ctx: Problems, techniques: Techniques) -> None:
    """Duplicate names (as written, or as defaulted once every stage parsed) and stages that cannot follow others."""
    if not isinstance(items, list):
        return
    complete = stages is not None and len(stages) == len(items)
    names = [s.name for s in stages] if complete else [s.get("name") if isinstance(s, dict) else None for s in items]
    for i, n in enumerate(names):
        if n is not None and n in names[:i]:
            ctx.add(("stages", i, "name"), f"duplicate stage name {n!r}; names label the report's rows")
    if complete:
        for j, message in techniques.order_problems([s.config for s in stages]):
            ctx.add(("stages", j, "type"), message)


def _resolve(model: ModelSpec | None, data: DataSpec | None, metric: Any, base_dir: Path, ctx: Problems) -> None:
    """Import factories and check files now, so that no work starts on a recipe that cannot finish."""
    for path, spec in ((("model", "factory"), model and model.factory),
                       (("data", "factory"), data and data.factory),
                       (("metric",), metric if isinstance(metric, str) and ":" in metric else None)):
        if spec is not None:
            try:
                import_callable(spec, str(base_dir))
            except ConfigError as exc:
                ctx.add(path, str(exc))
    for key in ("weights", "checkpoint"):
        value = getattr(model, key, None)
        if value is not None:
            file = Path(value).expanduser()
            file = file if file.is_absolute() else base_dir / file
            if not file.is_file():
                ctx.add(("model", key), f"file not found: {file}")


# ----------------------------------------------------------------------------------------------
# Building dataclasses from plain data, checked against their annotations


def _build(cls: type, data: Any, path: Loc, ctx: Problems, skip: tuple[str, ...] = ()) -> Any:
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
            ctx.add(path + (key,), f"unknown key {key!r} for {cls.__name__}{did_you_mean(str(key), fields)}; "
                                   f"allowed: {sorted(fields)}")
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
    typed_ok = len(ctx.problems) == before
    # A dataclass stops at its first invalid field: set each one found back to its default and build again, so
    # that one run lists every invalid value. Only the first error may be about no field in particular (a
    # combination of fields): later ones could come from the defaults put in.
    remaining = dict(kwargs)
    first = typed_ok
    while True:
        try:
            built = cls(**remaining)
        except ConfigError as exc:
            sub, message = _split_message(str(exc), set(fields))
            if sub and sub[0] in remaining:
                ctx.add(path + sub, message)
                del remaining[sub[0]]
                first = False
                continue
            if first:
                ctx.add(path + sub, message)
            return None
        except TypeError as exc:
            if first:
                ctx.add(path, str(exc))
            return None
        return built if typed_ok and remaining == kwargs else None


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
    keys = tuple(Key(k.strip("'\"")) for k in re.findall(r"\[([^\]]*)\]", m.group(2)))
    rest = m.group(3)
    return (name, *keys), (rest if re.match(r"[a-z]", rest) else msg)
