from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._version import __version__
from ..core.files import save_figure

METRIC_KEYS = ("accuracy", "params", "nonzero_params", "macs", "latency_ms", "size_bytes")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def build_report(*, model_name: str, dataset: str, device: str, baseline: dict, compressed: dict,
                 stages: list[dict], checkpoint: str, **extra: Any) -> dict[str, Any]:
    """Assemble the report.json dict (the shape every compressing command writes)."""
    report = {
        "torchslim_version": __version__,
        "model": model_name,
        "dataset": dataset,
        "device": device,
        "baseline": {k: baseline[k] for k in METRIC_KEYS},
        "compressed": {k: compressed[k] for k in METRIC_KEYS},
        "ratios": {
            "size": _ratio(baseline["size_bytes"], compressed["size_bytes"]),
            "nonzero_params": _ratio(baseline["nonzero_params"], compressed["nonzero_params"]),
            "macs": _ratio(baseline["macs"], compressed["macs"]),
            "latency": _ratio(baseline["latency_ms"], compressed["latency_ms"]),
        },
        "accuracy_drop": baseline["accuracy"] - compressed["accuracy"],
        "stages": stages,
        "checkpoint": checkpoint,
    }
    report.update(extra)
    return report


def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render_markdown(report: dict, plot_name: str | None) -> str:
    b, c, r = report["baseline"], report["compressed"], report["ratios"]
    lines = [
        f"# torchslim report: {report['model']} on {report['dataset']}",
        "",
        f"torchslim {report['torchslim_version']} · device {report['device']} · checkpoint `{report['checkpoint']}`",
        "",
        "| metric | baseline | compressed | ratio (baseline / compressed) |",
        "|---|---:|---:|---:|",
        f"| accuracy | {b['accuracy']:.4f} | {c['accuracy']:.4f} | drop {100 * report['accuracy_drop']:.2f} points |",
        f"| parameters | {_fmt_int(b['params'])} | {_fmt_int(c['params'])} | {_fmt(_ratio(b['params'], c['params']), '.2f')}x |",
        f"| non-zero parameters | {_fmt_int(b['nonzero_params'])} | {_fmt_int(c['nonzero_params'])} | {_fmt(r['nonzero_params'], '.2f')}x |",
        f"| MACs | {_fmt_int(b['macs'])} | {_fmt_int(c['macs'])} | {_fmt(r['macs'], '.2f')}x |",
        f"| latency (ms) | {_fmt(b['latency_ms'], '.3f')} | {_fmt(c['latency_ms'], '.3f')} | {_fmt(r['latency'], '.2f')}x |",
        f"| bytes on disk | {_fmt_int(b['size_bytes'])} | {_fmt_int(c['size_bytes'])} | {_fmt(r['size'], '.2f')}x |",
        "",
    ]
    if r["latency"] is not None and r["latency"] < 1.05:
        lines += ["> Latency did not improve on this device: the size gain is real, the speed gain is not "
                  "(unstructured zeros are not skipped by dense kernels).", ""]
    lines += ["## Stages", "", "| stage | accuracy | bytes on disk | seconds | config |", "|---|---:|---:|---:|---|"]
    for s in report["stages"]:
        cfg = json.dumps(s["config"], separators=(",", ":"))
        lines.append(f"| {s['name']} | {s['accuracy']:.4f} | {_fmt_int(s['size_bytes'])} | {s['seconds']:.1f} | `{cfg}` |")
    if plot_name:
        lines += ["", f"![accuracy vs size]({plot_name})", ""]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_size(report: dict, path: Path) -> None:
    """PNG: accuracy against bytes on disk for the baseline and each stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["baseline"] + [s["name"] for s in report["stages"]]
    sizes = [report["baseline"]["size_bytes"]] + [s["size_bytes"] for s in report["stages"]]
    accs = [report["baseline"]["accuracy"]] + [s["accuracy"] for s in report["stages"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([s / 1024 for s in sizes], [100 * a for a in accs], "o-")
    for n, s, a in zip(names, sizes, accs):
        ax.annotate(n, (s / 1024, 100 * a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bytes on disk (KiB, log scale)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(f"{report['model']} on {report['dataset']}")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)

