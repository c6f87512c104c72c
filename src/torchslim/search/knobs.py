"""Knobs: the values a search chooses, built from each technique's search space.

Each technique's descriptor (``torchslim.techniques.BUILTIN``) carries its search space: the fields that set a
compression rate, the layers they apply to, how a knob value becomes a field value, how to make a setting
milder, and the same technique without fine-tuning (for one-shot scans). Knobs are built from those generically.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from torch import nn

from ..core.config import Config
from ..core.technique import Techniques, identity_encode
from ..techniques import BUILTIN

__all__ = ["Knob", "build_knobs", "stage_configs", "soften"]


@dataclasses.dataclass(frozen=True)
class Knob:
    """One value the search chooses: ``field`` of stage ``stage`` for ``layer`` (None: the whole field)."""

    stage: int
    stage_name: str
    field: str
    layer: str | None
    low: float
    high: float
    mild: float
    grid: tuple[float, ...]
    choices: tuple | None = None
    param: Any = None
    encode: Callable[[float, Any], Any] = dataclasses.field(default=identity_encode, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.stage_name}.{self.field}" + (f"[{self.layer}]" if self.layer is not None else "")

    def aggressive(self) -> float:
        """The most compressing value."""
        if self.choices is not None:
            return self.choices[-1]
        return self.high if self.mild == self.low else self.low


def build_knobs(stages: Sequence, model: nn.Module, example_inputs: Any, techniques: Techniques = BUILTIN
                ) -> list[Knob]:
    """Every knob the stages allow (``StageSpec.search`` False freezes a stage, a tuple limits its fields).

    Per-layer knobs use the layer names of ``model``; after a stage that renames layers (a decomposition),
    later stages get one knob per field instead (when the field also takes a single value)."""
    knobs: list[Knob] = []
    renamed = False
    for i, stage in enumerate(stages):
        space = techniques.of(stage.config).search
        if space is None:
            continue
        if stage.search is not False:
            for fs in space.fields:
                if isinstance(stage.search, tuple) and fs.field not in stage.search:
                    continue
                common = dict(stage=i, stage_name=stage.name, field=fs.field, low=fs.low, high=fs.high,
                              mild=fs.mild, grid=fs.grid, choices=fs.choices, encode=fs.encode)
                if fs.layers is None or renamed:
                    if fs.scalar_ok:
                        knobs.append(Knob(layer=None, **common))
                    continue
                for layer, param in fs.layers(stage.config, model, example_inputs):
                    knobs.append(Knob(layer=layer, param=param, **common))
        renamed = renamed or space.renames_layers
    return knobs


def stage_configs(stages: Sequence, knobs: Sequence[Knob], values: dict[str, float],
                  techniques: Techniques = BUILTIN) -> list[Config | None]:
    """Each stage's config with the knob ``values`` (by knob name) filled in; None where a stage does nothing.
    Knobs missing from ``values`` take their mild value."""
    out: list[Config | None] = []
    for i, stage in enumerate(stages):
        mine = [k for k in knobs if k.stage == i]
        if not mine:
            out.append(stage.config)
            continue
        fields: dict[str, Any] = {}
        for k in mine:
            encoded = k.encode(values.get(k.name, k.mild), k.param)
            if k.layer is None:
                fields[k.field] = encoded
            else:
                entry = fields.setdefault(k.field, {})
                if encoded is not None:
                    entry[k.layer] = encoded
        out.append(techniques.of(stage.config).search.apply(stage.config, fields))
    return out


def soften(config: Config, factor: float, techniques: Techniques = BUILTIN) -> Config | None:
    """``config`` with its rates moved towards no compression by ``factor`` (None: it has none to soften)."""
    return techniques.soften(config, factor)
