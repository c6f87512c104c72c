"""The one copy of each config field check; each raises ConfigError naming the field. ``did_you_mean``
formats the closest names for any "unknown name" message."""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

from .errors import ConfigError


def check_finite(name: str, value: Any) -> None:
    """Refuse anything but a finite real number (bools, strings, NaN and +/-inf included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value} (NaN and infinity are not allowed)")


def check_fraction(name: str, value: float, *, allow_zero: bool = True, allow_one: bool = False) -> None:
    check_finite(name, value)
    lo_ok = value >= 0 if allow_zero else value > 0
    hi_ok = value <= 1 if allow_one else value < 1
    if not (lo_ok and hi_ok):
        lo = "0 <=" if allow_zero else "0 <"
        hi = "<= 1" if allow_one else "< 1"
        raise ConfigError(f"{name} must satisfy {lo} {name} {hi}, got {value}")


def check_choice(name: str, value: Any, choices: tuple) -> None:
    try:
        known = value in choices
    except TypeError:  # unhashable values (a mapping where a name belongs) against a set or dict of choices
        known = False
    if not known:
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    kind = "a positive integer" if integer else "a positive number"
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
    check_finite(name, value)
    if value <= 0:
        raise ConfigError(f"{name} must be {kind}, got {value!r}")


def check_nonnegative(name: str, value: Any) -> None:
    """A finite number >= 0 (weight decay, penalties, loss weights)."""
    check_finite(name, value)
    if value < 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value}")


def check_range(name: str, value: Any, lo: float, hi: float, *, integer: bool = False) -> None:
    """A finite number (an integer if ``integer``) with ``lo <= value <= hi``."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{name} must be an integer in {lo}..{hi}, got {value!r}")
    check_finite(name, value)
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")


def did_you_mean(name: str, names: Iterable[str], n: int = 1, cutoff: float = 0.6) -> str:
    """`` (did you mean 'a', 'b'?)`` with the names closest to ``name``, or "" when none is close."""
    close = difflib.get_close_matches(name, list(names), n=n, cutoff=cutoff)
    return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
