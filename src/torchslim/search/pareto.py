"""Pareto front of (metric, objective) points, the choice under a budget, and the front's plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from ..core.files import save_figure

__all__ = ["pareto_front", "choose", "plot_pareto", "OBJECTIVE_LABELS"]

OBJECTIVE_LABELS = {"size": "bytes on disk", "latency": "latency (ms)", "macs": "MACs"}


def pareto_front(points: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points not dominated by another (higher or equal ``metric`` and lower or equal ``objective``, one of them
    strictly), sorted by objective. Each point is a dict with at least ``metric`` and ``objective``."""
    front = []
    for p in points:
        dominated = any(q["metric"] >= p["metric"] and q["objective"] <= p["objective"]
                        and (q["metric"] > p["metric"] or q["objective"] < p["objective"]) for q in points)
        if not dominated:
            front.append(p)
    seen, unique = set(), []
    for p in sorted(front, key=lambda p: (p["objective"], -p["metric"])):
        key = (p["metric"], p["objective"])
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def choose(points: Sequence[dict[str, Any]], floor: float) -> tuple[dict[str, Any] | None, bool]:
    """The point with the smallest objective among those whose ``certified`` value (baseline minus the upper
    confidence bound of the drop; ``metric`` when absent) is ``>= floor`` (ties: higher metric), and True; when
    none meets the floor, the best found (highest certified value, ties: smaller objective) and False."""
    if not points:
        return None, False

    def certified(p: dict[str, Any]) -> float:
        return p.get("certified", p["metric"])

    feasible = [p for p in points if certified(p) >= floor - 1e-12]
    if feasible:
        return min(feasible, key=lambda p: (p["objective"], -p["metric"])), True
    return max(points, key=lambda p: (certified(p), -p["objective"])), False


def plot_pareto(points: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], chosen: dict[str, Any] | None,
                *, floor: float, baseline: dict[str, float], objective: str, path: str | Path,
                test_metric: float | None = None, title: str = "") -> Path:
    """PNG: every trial (validation metric against the objective), the Pareto front, the budget floor, the
    baseline and the chosen point (with its test-split metric when given)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    scale, unit = (1 / 1024, "KiB") if objective == "size" else (1.0, "")
    label = OBJECTIVE_LABELS.get(objective, objective) + (f" ({unit})" if unit else "")
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    ax.scatter([p["objective"] * scale for p in points], [100 * p["metric"] for p in points], s=14, color="0.65",
               label=f"trials ({len(points)})", zorder=2)
    if front:
        ax.plot([p["objective"] * scale for p in front], [100 * p["metric"] for p in front], "o-", color="C0",
                markersize=4, label="Pareto front", zorder=3)
    ax.axhline(100 * floor, color="C3", linestyle="--", linewidth=1, label="budget floor")
    ax.scatter([baseline["objective"] * scale], [100 * baseline["metric"]], marker="s", color="k", s=30,
               label="baseline", zorder=4)
    if chosen is not None:
        ax.scatter([chosen["objective"] * scale], [100 * chosen["metric"]], marker="*", color="C1", s=160,
                   label="chosen (val)", zorder=5)
        if test_metric is not None:
            ax.scatter([chosen["objective"] * scale], [100 * test_metric], marker="x", color="C1", s=60,
                       label="chosen (test)", zorder=5)
    if objective in ("size", "macs"):
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("metric (%, validation split)")
    ax.set_title(title or "accuracy vs " + OBJECTIVE_LABELS.get(objective, objective))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)
