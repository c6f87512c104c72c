"""Arithmetic on compression rates shared by the techniques' search spaces."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from .config import Config


def scale_rates(value: Any, factor: float, mild: float = 0.0) -> Any:
    """A rate (or per-layer mapping of rates) moved towards ``mild`` by ``factor`` (0: mild, 1: unchanged)."""
    if isinstance(value, dict):
        return {k: mild + (v - mild) * factor for k, v in value.items()}
    return mild + (value - mild) * factor


def soften_field(name: str) -> Callable[[Config, float], Config]:
    """``soften`` for a field holding a rate where 0 means no compression."""
    def soften_(config: Config, factor: float) -> Config:
        return config.replace(**{name: scale_rates(getattr(config, name), factor)})

    return soften_


def soften_bits(limit: int) -> Callable[[Config, float], Config | None]:
    """``soften`` for a ``bits`` field (an int or per-layer mapping): more bits, at most ``limit``."""
    def soften_(config: Config, factor: float) -> Config | None:
        def more(b: int) -> int:
            return min(limit, math.ceil(b / factor))

        bits = config.bits
        new = {k: more(v) for k, v in bits.items()} if isinstance(bits, dict) else more(bits)
        return None if new == bits else config.replace(bits=new)

    return soften_


def int_choice(value: float, param: Any) -> int:
    return int(value)


def capped_removals(scores: list[torch.Tensor], target: int, caps: list[int]) -> list[int]:
    """How many units leave each layer when the ``target`` lowest of all ``scores`` (one tensor per layer, on one
    scale) are removed, lowest first (ties by position), at most ``caps[i]`` from layer ``i``."""
    removed = [0] * len(scores)
    if not scores:
        return removed
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((s.numel(),), i) for i, s in enumerate(scores)])
    done = 0
    for idx in torch.argsort(flat, stable=True).tolist():
        if done >= target:
            break
        i = int(owner[idx])
        if removed[i] < caps[i]:
            removed[i] += 1
            done += 1
    return removed
