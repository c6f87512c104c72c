"""The one copy of each config field check; each raises ConfigError naming the field."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def check_fraction(name: str, value: float, *, allow_zero: bool = True, allow_one: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "0 <=" if allow_zero else "0 <"
        hi = "<= 1" if allow_one else "< 1"
        raise ConfigError(f"{name} must satisfy {lo} {name} {hi}, got {value}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
