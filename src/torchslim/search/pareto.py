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


def choose(points: Sequence[dict[str, Any]], floor: float, max_latency_ratio: float | None = None
           ) -> tuple[dict[str, Any] | None, bool]:
    """The point with the smallest objective among those whose ``certified`` value (baseline minus the upper
    confidence bound of the drop; ``metric`` when absent) is ``>= floor`` (and, with ``max_latency_ratio``, a
    ``latency_ratio`` at most that; ties: higher metric), and True; when none is feasible, the best found
    (highest certified value, ties: smaller objective) and False."""
    if not points:
        return None, False

    def certified(p: dict[str, Any]) -> float:
        return p.get("certified", p["metric"])

    feasible = [p for p in points if certified(p) >= floor - 1e-12 and (
        max_latency_ratio is None or p.get("latency_ratio", float("inf")) <= max_latency_ratio)]
    if feasible:
        return min(feasible, key=lambda p: (p["objective"], -p["metric"])), True
    return max(points, key=lambda p: (certified(p), -p["objective"])), False


def _size_axis(ax, objective: str) -> float:
    """Log x-axis in plain numbers (KiB for sizes, no 2x10^1 ticks); returns the scale applied to values."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    if objective not in ("size", "macs"):
        return 1.0
    ax.set_xscale("log")
    fmt = FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 10 else f"{x:.3g}")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    return 1 / 1024 if objective == "size" else 1.0


def plot_pareto(points: Sequence[dict[str, Any]], front: Sequence[dict[str, Any]], chosen: dict[str, Any] | None,
                *, floor: float, baseline: dict[str, float], objective: str, path: str | Path,
                test_metric: float | None = None, title: str = "", metric: str = "accuracy") -> Path:
    """PNG: every trial (validation metric against the objective), the Pareto front, the budget floor, the
    baseline and the chosen point (with its test-split metric when given). The y-axis is zoomed to the points
    near the budget (the floor, the baseline and what lies within a few points of them)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7.5, 4.4), dpi=100)
    scale = _size_axis(ax, objective)
    unit = {"size": "KiB, log scale", "macs": "log scale", "latency": "ms"}[objective] if objective in \
        ("size", "macs", "latency") else ""
    label = {"size": "saved size", "macs": "MACs", "latency": "latency at batch 1"}.get(objective, objective)
    ax.scatter([p["objective"] * scale for p in points], [100 * p["metric"] for p in points], s=16, color="0.6",
               label=f"trials ({len(points)})", zorder=3)
    if front:
        ax.plot([p["objective"] * scale for p in front], [100 * p["metric"] for p in front], "o-", color="C0",
                markersize=4, label="Pareto front", zorder=4)
    ax.axhline(100 * floor, color="C3", linestyle="--", linewidth=1.2,
               label=f"budget floor {100 * floor:.2f}% (baseline - {100 * (baseline['metric'] - floor):.2f} pt)")
    ax.scatter([baseline["objective"] * scale], [100 * baseline["metric"]], marker="s", color="k", s=30,
               label="baseline", zorder=5)
    ys = [100 * floor, 100 * baseline["metric"]]
    if chosen is not None:
        # Hollow and drawn first: the trial and front markers under it stay visible.
        ax.scatter([chosen["objective"] * scale], [100 * chosen["metric"]], marker="*", facecolors="none",
                   edgecolors="C1", linewidths=1.6, s=320, label="chosen (validation split)", zorder=2)
        ys.append(100 * chosen["metric"])
        if test_metric is not None:
            ax.scatter([chosen["objective"] * scale], [100 * test_metric], marker="x", color="C1", s=60,
                       label="chosen, on the test split", zorder=5)
            ys.append(100 * test_metric)
    near = [100 * p["metric"] for p in points if 100 * p["metric"] >= min(ys) - 3]
    lo, hi = min(ys + near), max(ys + near)
    pad = max(0.15 * (hi - lo), 0.3)
    ax.set_ylim(lo - pad, hi + pad)
    hidden = sum(100 * p["metric"] < lo - pad for p in points)
    ax.set_xlabel(f"{label} ({unit})" if unit else label)
    ax.set_ylabel(f"{metric} (%, validation split)")
    ax.set_title(title or f"{metric} vs {label}", fontsize=10)
    if hidden:
        ax.annotate(f"{hidden} trial(s) below {lo - pad:.1f}% not shown", xy=(0.01, 0.01), xycoords="axes fraction",
                    fontsize=7, color="0.4")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return save_figure(fig, path)
