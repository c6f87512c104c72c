"""Base class for technique configs.

Every technique is a frozen dataclass that validates its own fields and round-trips through a plain
dict (``to_dict`` / ``config_from_dict``), so recipes, checkpoint manifests and reports all describe a
stage with the same words the Python API uses.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar

from .errors import ConfigError

_CONFIG_TYPES: dict[str, type["Config"]] = {}


@dataclasses.dataclass(frozen=True)
class Config:
    """A versioned, self-validating technique config."""

    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _CONFIG_TYPES[cls.__name__] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError when a field is out of range. Subclasses extend this."""

    def to_dict(self, *, compact: bool = False) -> dict[str, Any]:
        """Plain data that :func:`config_from_dict` turns back into an equal config; ``compact`` leaves out fields
        at their default value (what a checkpoint's history stores, to keep files small)."""
        out: dict[str, Any] = {"type": type(self).__name__, "version": self.version}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if compact and f.default is not dataclasses.MISSING and _same(value, f.default):
                continue
            out[f.name] = value.to_dict(compact=compact) if isinstance(value, Config) else _to_plain(value)
        return out

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # e.g. tensors, whose == is elementwise
        return False


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def config_types() -> dict[str, type[Config]]:
    """All known config classes by name (the names recipes use)."""
    return dict(_CONFIG_TYPES)


def config_from_dict(data: dict[str, Any], where: str = "config") -> Config:
    """Rebuild a config from ``to_dict`` output; errors name the offending key."""
    if not isinstance(data, dict) or "type" not in data:
        raise ConfigError(f"{where}: expected a mapping with a 'type' key, got {data!r}")
    data = dict(data)
    name = data.pop("type")
    data.pop("version", None)
    cls = _CONFIG_TYPES.get(name)
    if cls is None:
        raise ConfigError(f"{where}: unknown config type {name!r}; known: {sorted(_CONFIG_TYPES)}")
    return _build(cls, data, where)


def _build(cls: type[Config], data: dict[str, Any], where: str) -> Config:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints.get(key)
        if isinstance(value, dict) and "type" in value:
            value = config_from_dict(value, f"{where}.{key}")
        elif isinstance(value, dict) and _config_class_in(hint) is not None:
            value = _build(_config_class_in(hint), value, f"{where}.{key}")
        elif isinstance(value, list) and _is_tuple_hint(hint):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _config_class_in(hint: Any) -> type[Config] | None:
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and issubclass(arg, Config):
            return arg
    return None


def _is_tuple_hint(hint: Any) -> bool:
    return any(typing.get_origin(a) is tuple or a is tuple for a in (hint, *typing.get_args(hint)))
