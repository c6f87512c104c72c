"""The low-rank techniques' descriptors (SVD, Tucker-2, CP): apply, family, order rules and search spaces."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from torch import nn

from ..core.config import Config
from ..core.technique import FieldSpace, LayerList, SearchSpace, Technique
from .config import CP, SVD, Tucker, selected
from .cp import cp_max_rank
from .decompose import decompose

RANK_GRID = (0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05)
_ORDER = {"unstructured": "decomposing replaces the masked weights by dense factors, losing the zeros; "
                          "decompose before pruning",
          "quantize": "decomposing after quantization breaks the quantized weights; quantize last"}


def _linears(config: Config, model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    return [(n, min(m.in_features, m.out_features)) for n, m in model.named_modules()
            if n and type(m) is nn.Linear and selected(config, n)]


def _convs(config: Config, model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    return [(n, (m.in_channels, m.out_channels)) for n, m in model.named_modules()
            if n and type(m) is nn.Conv2d and m.groups == 1 and selected(config, n)]


def _cp_convs(config: Config, model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    return [(n, cp_max_rank(m)) for n, m in model.named_modules()
            if n and type(m) is nn.Conv2d and m.groups == 1 and selected(config, n)]


def _rank_of(fraction: float, max_rank: Any) -> Any:
    """Kept share of the maximal rank -> rank (None: leave the layer whole)."""
    if fraction >= 1.0:
        return None
    if isinstance(max_rank, tuple):
        return tuple(max(1, round(fraction * r)) for r in max_rank)
    return max(1, round(fraction * max_rank))


def _apply_ranks(rank_field: str) -> Callable[[Config, dict[str, Any]], Config | None]:
    def apply(config: Config, values: dict[str, Any]) -> Config | None:
        ranks = values.get(rank_field)
        if ranks is None:
            return config
        if isinstance(ranks, dict) and not ranks:
            return None  # every layer stays whole: the stage has nothing to do
        names = {f.name for f in dataclasses.fields(config)}
        clear = {k: None for k in ("energy", "ratio", "max_drop") if k in names}
        return config.replace(**clear, **{rank_field: ranks})

    return apply


def _soften_ranks(rank_field: str) -> Callable[[Config, float], Config | None]:
    def soften_(config: Config, factor: float) -> Config | None:
        def more(r: Any) -> Any:
            if isinstance(r, (tuple, list)):
                return tuple(math.ceil(x / factor) for x in r)
            return math.ceil(r / factor)

        selection = getattr(config, "selection", None)
        if selection == "rank":
            value = getattr(config, rank_field)
            value = {k: more(v) for k, v in value.items()} if isinstance(value, dict) else more(value)
            return config.replace(**{rank_field: value})
        if selection == "energy":
            return config.replace(energy=1 - (1 - config.energy) * factor)
        if selection == "ratio":
            return config.replace(ratio=1 - (1 - config.ratio) * factor)
        if selection == "sensitivity":
            return config.replace(max_drop=config.max_drop * factor)
        return None

    return soften_


def _technique(config: type[Config], rank_field: str, layers: LayerList) -> Technique:
    space = SearchSpace(
        fields=(FieldSpace(rank_field, low=0.02, high=1.0, mild=1.0, grid=RANK_GRID, layers=layers, encode=_rank_of,
                           reduces=frozenset({"size", "macs", "latency"}), scalar_ok=False),),
        apply=_apply_ranks(rank_field), oneshot=lambda c: c, soften=_soften_ranks(rank_field), renames_layers=True)
    return Technique(config=config, apply=decompose, family="lowrank", cannot_follow=_ORDER, search=space)


TECHNIQUES = (_technique(SVD, "rank", _linears), _technique(Tucker, "ranks", _convs), _technique(CP, "rank", _cp_convs))
