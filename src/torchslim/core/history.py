"""The compression history a model carries: one record per applied technique, saved in its checkpoint."""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import Config

ATTR = "torchslim_history"


def record(model: nn.Module, config: Config, report: dict[str, Any] | None = None) -> nn.Module:
    """Append ``config`` (and an optional per-layer ``report``) to ``model``'s history; returns ``model``.
    Fields at their default value are left out (``config_from_dict`` restores them)."""
    entry = config.to_dict(compact=True)
    if report is not None:
        entry["report"] = report
    # A plain attribute (not a buffer): copies and deep copies carry it, state_dict does not.
    model.__dict__[ATTR] = [*history(model), entry]
    return model


def history(model: nn.Module) -> list[dict[str, Any]]:
    """The records of every technique applied to ``model`` so far, oldest first (config dicts, plus "report")."""
    return list(model.__dict__.get(ATTR, ()))


def carry(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give ``target`` (a new model built from ``source``, e.g. a converted graph) ``source``'s history when it
    has none of its own; returns ``target``."""
    if target is not source and ATTR not in target.__dict__:
        target.__dict__[ATTR] = history(source)
    return target
