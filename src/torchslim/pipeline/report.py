from __future__ import annotations

from pathlib import Path
from typing import Any

from .._version import __version__
from ..core.files import save_figure

METRIC_KEYS = ("accuracy", "params", "nonzero_params", "table_params", "macs", "latency_ms", "size_bytes")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _metrics(block: dict) -> dict[str, Any]:
    return {k: block.get(k, 0) if k == "table_params" else block[k] for k in METRIC_KEYS}


def build_report(*, model_name: str, dataset: str, device: str, baseline: dict, compressed: dict,
                 stages: list[dict], checkpoint: str, **extra: Any) -> dict[str, Any]:
    """Assemble the report.json dict (the shape every compressing command writes)."""
    report = {
        "torchslim_version": __version__,
        "model": model_name,
        "dataset": dataset,
        "device": device,
        "baseline": _metrics(baseline),
        "compressed": _metrics(compressed),
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


# Stage types whose compressed form runs no faster on dense CPU kernels, and why (for the latency note).
_SLOW_CAUSES = {
    "UnstructuredPruning": "unstructured zeros, which dense kernels do not skip",
    "WeightSharing": "shared (k-means) weight values, decoded back to dense float weights",
    "QAT": "{bits}-bit QAT layers, which run as float fake-quantized layers (no fast {bits}-bit kernel)",
    "WeightOnly": "weight-only {bits}-bit layers, dequantized on every call",
    "TernaryWeights": "ternary weights, which run as float layers",
    "BinaryWeights": "binary weights, which run as float layers",
    "MixedPrecision": "mixed-precision layers, which run as float fake-quantized layers",
}


def latency_causes(stages: list[dict]) -> list[str]:
    """Why the compressed model may be no faster: one phrase per stage type that does not reduce dense work."""
    out = []
    for st in stages:
        cfg = st.get("config") or {}
        cause = _SLOW_CAUSES.get(cfg.get("type", ""))
        if cause and st.get("guard") != "rolled_back":
            phrase = cause.format(bits=cfg.get("bits", "low"))
            if phrase not in out:
                out.append(phrase)
    return out


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for k, v in d.items():
        if k in ("version",) or (k == "type" and prefix):
            continue
        if isinstance(v, dict) and v and not all(isinstance(x, (int, float)) for x in v.values()):
            rows += _flatten(v, f"{prefix}{k}.")
        else:
            rows.append((prefix + k, v))
    return rows


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) or "{}"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(map(_value, v)) or "[]"
    return str(v)


def config_table(config: dict) -> list[str]:
    """A stage's config as a markdown table, one row per field (nested configs as dotted names)."""
    lines = ["| field | value |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in _flatten(config) if k != "type"]
    return lines


def render_markdown(report: dict, plot_name: str | None) -> str:
    b, c, r = report["baseline"], report["compressed"], report["ratios"]
    title = report.get("title")
    title = f"{title}: {report['model']} on {report['dataset']}" if title and title != "recipe" else \
        f"{report['model']} on {report['dataset']}"
    lines = [
        f"# torchslim report: {title}",
        "",
        f"torchslim {report['torchslim_version']} · device {report['device']} · checkpoint `{report['checkpoint']}`",
        "",
        "| metric | baseline | compressed | ratio (baseline / compressed) |",
        "|---|---:|---:|---:|",
        f"| {report.get('metric', 'accuracy')} (test split) | {b['accuracy']:.4f} | {c['accuracy']:.4f} | drop "
        f"{100 * report['accuracy_drop']:.2f} points |",
        f"| parameters | {_fmt_int(b['params'])} | {_fmt_int(c['params'])} | {_fmt(_ratio(b['params'], c['params']), '.2f')}x |",
        f"| non-zero parameters | {_fmt_int(b['nonzero_params'])} | {_fmt_int(c['nonzero_params'])} | {_fmt(r['nonzero_params'], '.2f')}x |",
        *([f"| codebook and quantization-step entries | {_fmt_int(b.get('table_params', 0))} | "
           f"{_fmt_int(c.get('table_params', 0))} | |"] if b.get("table_params") or c.get("table_params") else []),
        f"| MACs | {_fmt_int(b['macs'])} | {_fmt_int(c['macs'])} | {_fmt(r['macs'], '.2f')}x |",
        f"| latency (ms, batch 1) | {_fmt(b['latency_ms'], '.3f')} | {_fmt(c['latency_ms'], '.3f')} | {_fmt(r['latency'], '.2f')}x |",
        f"| bytes on disk (saved file) | {_fmt_int(b['size_bytes'])} | {_fmt_int(c['size_bytes'])} | {_fmt(r['size'], '.2f')}x |",
        "",
    ]
    if r["latency"] is not None and r["latency"] < 1.05:
        causes = latency_causes(report["stages"])
        why = f" ({'; '.join(causes)})" if causes else ""
        lines += [f"> Latency did not improve on this device: the size gain is real, the speed gain is not{why}.", ""]
    noise = report.get("latency_noise") or {}
    if noise.get("noisy"):
        load = noise.get("load_average")
        spread = max(noise.get("spread", {0: 0}).values())
        lines += [f"> **Noisy latency measurement:** the repeats spread by {100 * spread:.0f}% (interquartile range "
                  f"/ median)" + (f" and the load average was {load:.1f} on {noise.get('cpus')} CPUs" if load else "")
                  + "; compare the ratio, measured side by side, rather than the milliseconds.", ""]
    lines += ["## Stages", "",
              "| stage | val accuracy (decisions) | test accuracy | bytes on disk | seconds | guard |",
              "|---|---:|---:|---:|---:|---|"]
    for st in report["stages"]:
        val = st.get("val_accuracy")
        lines.append(f"| {st['name']} | {_fmt(val, '.4f')} | {st['accuracy']:.4f} | {_fmt_int(st['size_bytes'])} | "
                     f"{st['seconds']:.1f} | {st.get('guard', '-')} |")
    for st in report["stages"]:
        if st.get("config"):
            lines += ["", f"### Stage `{st['name']}`: {st['config'].get('type', '')}", ""] + config_table(st["config"])
    if plot_name:
        lines += ["", f"![accuracy vs size]({plot_name})", ""]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_size(report: dict, path: Path) -> None:
    """PNG: test-split metric (%) against the saved size (KiB) for the baseline and each stage, with the budget
    as a line, the y-axis zoomed to the points and the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    metric = report.get("metric", "accuracy")
    names = ["baseline"] + [s["name"] for s in report["stages"]]
    sizes = [report["baseline"]["size_bytes"]] + [s["size_bytes"] for s in report["stages"]]
    accs = [100 * report["baseline"]["accuracy"]] + [100 * s["accuracy"] for s in report["stages"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    ax.plot([s / 1024 for s in sizes], accs, "o-", zorder=3)
    groups: list[tuple[float, float, list[str]]] = []  # one label for stages that land on (nearly) the same point
    for n, s, a in zip(names, sizes, accs):
        near = next((g for g in groups if abs(s / g[0] - 1) < 0.02 and abs(a - g[1]) < 0.05), None)
        if near:
            near[2].append(n)
        else:
            groups.append((s, a, [n]))
    for s, a, group in groups:
        ax.annotate(", ".join(group), (s / 1024, a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ys = list(accs)
    drop = (report.get("budget") or {}).get("max_accuracy_drop")
    if drop is not None:
        line = accs[0] - 100 * drop
        ax.axhline(line, color="C3", linestyle="--", linewidth=1.2,
                   label=f"budget: baseline - {100 * drop:.2f} pt (test split)")
        ys.append(line)
        ax.legend(fontsize=7, loc="best")
    lo, hi = min(ys), max(ys)
    pad = max(0.15 * (hi - lo), 0.3)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 10 else f"{x:.3g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: ""))
    ax.set_xlabel("saved size (KiB, log scale)")
    ax.set_ylabel(f"{metric} (%, test split)")
    title = report.get("title")
    ax.set_title(f"{title + ': ' if title and title != 'recipe' else ''}{report['model']} on {report['dataset']}",
                 fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path)
