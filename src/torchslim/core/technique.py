"""The technique descriptor: everything the pipeline, the search and the checkpoint need to know about one
technique, in one place, so that adding a technique touches that technique's folder and the built-in list only.

A technique is a config class plus a function that applies it (``apply(model, config, **inputs) -> nn.Module``,
the verb contract shared by ``prune``, ``quantize``, ``decompose``, ``distill``). The descriptor adds its family
(and which earlier families it may not follow), how a search tunes it (:class:`SearchSpace`) and the checkpoint
codecs of the modules it creates.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping

from torch import nn

from .config import Config
from .errors import ConfigError
from .registry import Registry

LayerList = Callable[[Config, nn.Module, Any], list[tuple[str, Any]]]
"""``layers(config, model, example_inputs) -> [(layer name, param), ...]``: one knob per entry."""


def identity_encode(value: float, param: Any) -> Any:
    return float(value)


@dataclasses.dataclass(frozen=True)
class FieldSpace:
    """One searchable field. Knob values run from ``mild`` (no compression) to the other end of [low, high];
    ``grid`` (mild -> aggressive) is what one-shot scans try. ``layers`` lists ``(layer, param)`` pairs, one knob
    each (None: one knob for the whole field); ``encode(value, param)`` turns a knob value into the field's
    entry for that layer (None: leave the layer alone). ``choices`` makes the knob discrete (e.g. bits);
    ``reduces`` names the objectives (size, macs, latency) the field can lower."""

    field: str
    low: float
    high: float
    mild: float
    grid: tuple[float, ...]
    layers: LayerList | None = None
    encode: Callable[[float, Any], Any] = identity_encode
    valid: Callable[[Config, nn.Module, Any], list[str]] | None = None
    reduces: frozenset = frozenset({"size"})
    choices: tuple | None = None
    scalar_ok: bool = True

    def valid_keys(self, config: Config, model: nn.Module, example_inputs: Any) -> list[str]:
        """Names a per-layer mapping of this field may use."""
        if self.valid is not None:
            return self.valid(config, model, example_inputs)
        return [name for name, _ in (self.layers(config, model, example_inputs) if self.layers else [])]


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """How a search tunes one technique: its fields; ``apply(config, {field: value})`` (None: the stage does
    nothing); ``oneshot(config)`` (the same technique without fine-tuning, for scans); ``soften(config, factor)``
    (milder rates, None: nothing to soften); ``renames_layers`` when the technique replaces layers by
    differently named ones."""

    fields: tuple[FieldSpace, ...]
    apply: Callable[[Config, dict[str, Any]], Config | None]
    oneshot: Callable[[Config], Config]
    soften: Callable[[Config, float], Config | None]
    renames_layers: bool = False


@dataclasses.dataclass(frozen=True)
class Technique:
    """One technique. ``apply(model, config, *, data, val_data, example_inputs, loss_fn, metric[, teacher])``
    returns a new model; ``family`` groups techniques for order rules; ``cannot_follow`` maps an earlier
    family to the reason this technique may not come after it; ``needs_teacher`` when ``apply`` takes the
    uncompressed original as ``teacher``; ``codecs`` are the checkpoint codecs of the modules it creates."""

    config: type[Config]
    apply: Callable[..., nn.Module]
    family: str
    cannot_follow: Mapping[str, str] = dataclasses.field(default_factory=dict)
    search: SearchSpace | None = None
    codecs: tuple = ()
    needs_teacher: bool = False

    @property
    def name(self) -> str:
        return self.config.__name__


class Techniques(Registry[type, Technique]):
    """Techniques keyed by config class; recipes look them up by class name."""

    def __init__(self, techniques: Iterable[Technique] = ()):
        super().__init__("technique")
        for t in techniques:
            self.register(t)

    def register(self, technique: Technique) -> Technique:
        if not (isinstance(technique.config, type) and issubclass(technique.config, Config)):
            raise ConfigError(f"Technique.config must be a Config subclass, got {technique.config!r}")
        if any(t.name == technique.name for t in self.values()):
            raise ConfigError(f"a technique for a config named {technique.name!r} is already registered; "
                              "recipes name configs by class name, so names must be unique")
        return self.add(technique.config, technique)

    def of(self, config: Config) -> Technique:
        """The technique of ``config`` (an instance)."""
        t = self._items.get(type(config))
        if t is None:
            raise ConfigError(f"no technique is registered for {type(config).__name__}; registered: "
                              f"{sorted(self.names())}")
        return t

    def named(self, name: str) -> Technique:
        for t in self.values():
            if t.name == name:
                return t
        raise ConfigError(f"unknown stage type {name!r}; known: {sorted(self.names())}")

    def names(self) -> list[str]:
        return [t.name for t in self.values()]

    def order_problems(self, configs: list[Config]) -> list[tuple[int, str]]:
        """``(index, message)`` for each config that may not follow an earlier one."""
        families = [self.of(c).family for c in configs]
        out = []
        for j, config in enumerate(configs):
            rules = self.of(config).cannot_follow
            for i in range(j):
                why = rules.get(families[i])
                if why:
                    out.append((j, f"{type(config).__name__} cannot follow {type(configs[i]).__name__} "
                                    f"(stages[{i}]): {why}"))
        return out

    def searchable(self) -> list[str]:
        """Names of the techniques a search can tune."""
        return [t.name for t in self.values() if t.search is not None]

    def soften(self, config: Config, factor: float) -> Config | None:
        """``config`` with its rates moved towards no compression by ``factor`` (None: nothing to soften)."""
        t = self._items.get(type(config))
        if t is None or t.search is None:
            return None
        try:
            return t.search.soften(config, factor)
        except ConfigError:  # the softened value left the field's range
            return None
