"""Allocation for the fast strategy: from a one-shot sensitivity scan, a path of settings ordered from most to
least aggressive (a Lagrangian relaxation: for a multiplier mu, each knob takes the grid value maximising
``objective saving - mu * output error``), and the bisection along it."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .knobs import Knob

__all__ = ["lagrangian_path", "bisect_path", "bisection_steps", "spread"]


def lagrangian_path(knobs: Sequence[Knob], sens: dict[str, Any]) -> list[dict[str, float]]:
    """Settings ordered from most to least aggressive: for each multiplier mu, every knob takes the scanned value
    maximising ``relative objective saving - mu * output error`` (ties: the milder value). Consecutive
    duplicates are dropped; the last setting leaves every knob mild."""
    base = sens["baseline"]["objective"]
    options: dict[str, list[tuple[float, float, float]]] = {}
    slopes: set[float] = set()
    for k in knobs:
        pts = [(k.mild, 0.0, 0.0)]
        for p in sens["knobs"].get(k.name, []):
            pts.append((p["value"], max(0.0, p["error"]), (base - p["objective"]) / base if base else 0.0))
        options[k.name] = pts
        for i, (_, e1, s1) in enumerate(pts):
            for _, e2, s2 in pts[i + 1:]:
                if (s2 - s1) * (e2 - e1) > 0:
                    slopes.add(abs((s2 - s1) / (e2 - e1)))
    ordered = sorted(slopes)
    mus = [0.0] + [math.sqrt(a * b) if a > 0 else b / 2 for a, b in zip(ordered, ordered[1:])]
    if ordered:
        mus = [0.0] + ([ordered[0] / 2] if ordered[0] > 0 else []) + mus[1:] + [ordered[-1] * 2]
    mus.append(math.inf)

    def pick(mu: float, pts: list[tuple[float, float, float]]) -> float:
        if math.isinf(mu):
            return pts[0][0]
        best = max(pts, key=lambda p: (p[2] - mu * p[1], -p[1]))
        return best[0]

    path: list[dict[str, float]] = []
    for mu in mus:
        alloc = {name: pick(mu, pts) for name, pts in options.items()}
        if not path or alloc != path[-1]:
            path.append(alloc)
    return path


def bisection_steps(n: int) -> int:
    """About how many evaluations :func:`bisect_path` needs on a path of ``n`` settings."""
    return max(1, math.ceil(math.log2(n + 1)))


def bisect_path(n: int, metric_at: Callable[[int], float], floor: float) -> int:
    """The index of the most aggressive setting meeting ``floor`` on a path of ``n`` settings (most aggressive
    first), assuming the metric rises along the path; the mildest (last) is the answer when none meets it.
    ``metric_at(i)`` evaluates setting ``i``; the returned setting has always been evaluated."""
    lo, hi = -1, n - 1  # path[lo] misses (virtually), path[hi] is the mildest
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if metric_at(mid) >= floor:
            hi = mid
        else:
            lo = mid
    metric_at(hi)
    return hi


def spread(path: Sequence[dict[str, float]], trials: int) -> list[dict[str, float]]:
    """Up to four settings spread evenly along ``path`` (at most one per four trials, at least one): the warm
    start of the optuna strategy."""
    picks = sorted({round(i * (len(path) - 1) / 3) for i in range(4)}) if len(path) > 1 else [0]
    return [path[i] for i in picks[: max(0, trials // 4)] or picks[:1]]
