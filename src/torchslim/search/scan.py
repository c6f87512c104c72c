"""One-shot sensitivity: how much each knob (for the search) or each layer (for the user) hurts on its own.

:func:`knob_sensitivity` scans the search's knobs; :func:`sensitivity` is the user-facing scan: per layer, the
metric (and the output error) against unstructured sparsity and against weight bit width, each layer alone,
without fine-tuning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, UnsupportedModelError
from ..core.files import atomic_write, save_figure, writable_folder
from ..core.technique import Techniques
from ..data import Splits, check_loader
from ..data.batches import call_model, output_tensor, split_batch, to_device
from ..metrics import evaluate
from ..metrics.evaluate import model_device
from ..nn.modules import copy_model, match
from ..pipeline.runner import StageInputs, apply_stage
from ..pruning.unstructured import make_permanent, prunable_layers
from ..quantization.spec import QuantSpec
from ..techniques import BUILTIN
from .knobs import Knob, stage_configs

__all__ = ["knob_sensitivity", "output_error", "sensitivity", "SensitivityResult"]


def _batches(loader, device: torch.device) -> list[tuple[Any, Any]]:
    out = []
    for batch in loader:
        x, y = split_batch(batch)
        out.append((to_device(x, device), y))
    return out


@torch.no_grad()
def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    try:
        return [output_tensor(call_model(model, x)).detach().float().cpu() for x, _ in batches]
    finally:
        model.train(was)


def output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Relative squared error of ``outputs`` against ``reference``: sum((o - r)^2) / sum(r^2)."""
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs, reference))
    den = sum(float((r ** 2).sum()) for r in reference)
    return num / max(den, 1e-30)


def _top1(outputs: list[torch.Tensor], batches: list) -> float | None:
    if any(y is None for _, y in batches):
        return None
    correct = sum(int((o.argmax(1) == y.cpu()).sum()) for o, (_, y) in zip(outputs, batches))
    return correct / max(1, sum(len(y) for _, y in batches))


def knob_sensitivity(model: nn.Module, stages: Sequence, knobs: Sequence[Knob], data, example_inputs: tuple, *,
                     metric_fn: Callable, objective_fn: Callable[[nn.Module], float], progress: bool = True,
                     techniques: Techniques = BUILTIN, resume: dict[str, Any] | None = None,
                     on_point: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """One-shot scan for the search: each knob alone at each grid value (its stage without fine-tuning, every
    other knob mild) on ``model``; per point the relative output error and metric on ``data.val`` and the
    objective. Returns ``{"baseline": {...}, "knobs": {name: [{"value", "error", "metric", "objective"}]}}``.

    ``on_point(result so far)`` runs after each point; a partial result of the same model and knobs passed as
    ``resume`` (a re-run after a kill) keeps its points instead of computing them again."""
    batches = _batches(data.val, model_device(model))
    reference = _outputs(model, batches)
    inputs = StageInputs(data=data, example_inputs=example_inputs, teacher=model, techniques=techniques)

    def score(m: nn.Module) -> tuple[float, float]:
        outs = _outputs(m, batches)
        acc = _top1(outs, batches) if metric_fn is evaluate else None
        return output_error(outs, reference), (acc if acc is not None else float(metric_fn(m, data.val)))

    base_metric = score(model)[1]
    result: dict[str, Any] = {"baseline": {"metric": base_metric, "objective": float(objective_fn(model))},
                              "knobs": {k.name: [] for k in knobs}}
    if resume is not None and set(resume.get("knobs", {})) == set(result["knobs"]):
        result["knobs"] = {name: list(rows) for name, rows in resume["knobs"].items()}
    finished = {(name, r["value"]) for name, rows in result["knobs"].items() for r in rows}
    points = [(k, v) for k in knobs for v in k.grid if (k.name, v) not in finished]
    bar = tqdm(points, desc="sensitivity", disable=None if progress else True, leave=False, dynamic_ncols=True)
    for knob, value in bar:
        stage = stages[knob.stage]
        config = stage_configs([stage], [dataclasses.replace(knob, stage=0)], {knob.name: value}, techniques)[0]
        if config is None:
            continue
        config = techniques.of(config).search.oneshot(config)
        try:
            compressed = apply_stage(model, config, inputs)
        except (ConfigError, UnsupportedModelError) as exc:
            raise ConfigError(f"one-shot scan of {knob.name} at {value}: {exc}") from None
        error, metric = score(compressed)
        result["knobs"][knob.name].append(
            {"value": value, "error": error, "metric": metric, "objective": float(objective_fn(compressed))})
        if on_point is not None:
            on_point(result)
    bar.close()
    return result


# ----------------------------------------------------------------------------------------------
# The user-facing per-layer scan


@dataclasses.dataclass
class SensitivityResult:
    """Rows ``{"layer", "kind" ("sparsity" or "bits"), "value", "metric", "drop", "output_error"}``."""

    baseline: float
    metric: str
    rows: list[dict[str, Any]]

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "baseline": self.baseline, "rows": self.rows}

    def to_markdown(self) -> str:
        lines = [f"# Sensitivity ({self.metric} on the validation split, baseline {self.baseline:.4f})", "",
                 "Each layer alone, one-shot (no fine-tuning). Cells: metric drop / relative output error.", ""]
        for kind, title in (("sparsity", "Unstructured sparsity (magnitude)"),
                            ("bits", "Weight bits (symmetric, per output channel)")):
            rows = [r for r in self.rows if r["kind"] == kind]
            if not rows:
                continue
            values = list(dict.fromkeys(r["value"] for r in rows))
            lines += [f"## {title}", "", "| layer | " + " | ".join(f"{v:g}" for v in values) + " |",
                      "|---|" + "---:|" * len(values)]
            for layer in self.layers():
                cells = {r["value"]: r for r in rows if r["layer"] == layer}
                lines.append(f"| {layer} | " + " | ".join(
                    f"{cells[v]['drop']:+.4f} / {cells[v]['output_error']:.2e}" if v in cells else "-"
                    for v in values) + " |")
            lines.append("")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """PNG: per layer, the metric (%) against sparsity and against bits; the panels share one y-axis, at
        least two points tall, so that a one-sample difference does not look like an effect."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        kinds = [k for k in ("sparsity", "bits") if any(r["kind"] == k for r in self.rows)]
        fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(6 * max(1, len(kinds)), 4), dpi=100, squeeze=False,
                                 sharey=True)
        ys = [100 * r["metric"] for r in self.rows] + [100 * self.baseline]
        lo, hi = min(ys), max(ys)
        pad = max(0.1 * (hi - lo), (2.0 - (hi - lo)) / 2, 0.2)
        for ax, kind in zip(axes[0], kinds):
            for layer in self.layers():
                rows = [r for r in self.rows if r["kind"] == kind and r["layer"] == layer]
                ax.plot([r["value"] for r in rows], [100 * r["metric"] for r in rows], "o-", label=layer, markersize=3)
            ax.axhline(100 * self.baseline, color="grey", linestyle=":", linewidth=1, label="baseline")
            ax.set_xlabel("sparsity (fraction of weights zeroed)" if kind == "sparsity" else "weight bits")
            if kind == "bits":
                ax.invert_xaxis()
            ax.set_ylim(lo - pad, hi + pad)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel(f"{self.metric} (%, validation split)")
        fig.suptitle("one-shot sensitivity per layer, each layer alone (validation split)")
        fig.tight_layout()
        return save_figure(fig, path)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """sensitivity.json, sensitivity.md and sensitivity.png in ``out_dir``, each written atomically."""
        out = Path(out_dir)
        writable_folder(out)
        paths = {"json": out / "sensitivity.json", "markdown": out / "sensitivity.md", "plot": out / "sensitivity.png"}
        self.plot(paths["plot"])
        atomic_write(paths["json"], (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        md = self.to_markdown() + f"\n![sensitivity]({paths['plot'].name})\n"
        atomic_write(paths["markdown"], md.encode())
        return paths


def _fake_quant(weight: torch.Tensor, bits: int) -> torch.Tensor:
    return QuantSpec(bits=bits, symmetric=True, granularity="channel", axis=0).fake_quantize(weight)


def _magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = round(sparsity * weight.numel())
    if n <= 0:
        return weight.clone()
    flat = weight.flatten().clone()
    flat[torch.topk(flat.abs(), n, largest=False, sorted=False).indices] = 0
    return flat.view_as(weight)


def sensitivity(model: nn.Module, data, *, sparsities: Iterable[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                bits: Iterable[int] = (8, 6, 4, 3, 2), layers: Sequence[str] | None = None,
                metric: Callable | None = None, metric_name: str = "accuracy",
                progress: bool = True, resume: str | Path | None = None) -> SensitivityResult:
    """Per layer, ``metric`` (default top-1 accuracy) and relative output error against unstructured sparsity
    and against weight bit width, one-shot: each layer alone, no fine-tuning. ``data`` is a loader or a
    :class:`~torchslim.data.Splits` (its ``val`` split is used, never ``test``). ``model`` is not modified.

    ``layers``: fnmatch patterns limiting the scan (default: every Linear / Conv layer). ``resume``: a file that
    each finished point is appended to; a scan of the same model and settings (a re-run after a kill) skips the
    points it holds, one of another model or settings starts it afresh. Remove it once the result is written."""
    loader = data.val if isinstance(data, Splits) else data
    check_loader(loader, "sensitivity data")
    sparsities, bits = [float(s) for s in sparsities], [int(b) for b in bits]
    for s in sparsities:
        if not 0 <= s < 1:
            raise ConfigError(f"sparsities must satisfy 0 <= s < 1, got {s}")
    work = make_permanent(copy_model(model)).eval()
    targets = prunable_layers(work)
    if layers:
        targets = {n: m for n, m in targets.items() if match(n, layers) is not None}
    if not targets:
        raise UnsupportedModelError(f"no Linear/Conv layer of {type(model).__name__} matches layers={layers}")
    metric_fn = metric or evaluate
    batches = _batches(loader, model_device(work))
    reference = _outputs(work, batches)

    def score() -> tuple[float, float]:
        outs = _outputs(work, batches)
        acc = _top1(outs, batches) if metric_fn is evaluate else None
        return (acc if acc is not None else float(metric_fn(work, loader))), output_error(outs, reference)

    baseline = score()[0]
    rows: list[dict[str, Any]] = []
    plan = [(n, "sparsity", s) for n in targets for s in sparsities] + [(n, "bits", b) for n in targets for b in bits]
    done: dict[tuple, dict[str, Any]] = {}
    if resume is not None:
        key = _scan_key(work, plan, metric_name, baseline)
        done = _open_progress(Path(resume), key)
    bar = tqdm(plan, desc="sensitivity", disable=None if progress else True, leave=False, dynamic_ncols=True)
    for name, kind, value in bar:
        if (name, kind, value) in done:
            rows.append(done[(name, kind, value)])
            continue
        layer = targets[name]
        original = layer.weight.data.clone()
        try:
            layer.weight.data = _magnitude(original, value) if kind == "sparsity" else _fake_quant(original, value)
            m, err = score()
        finally:
            layer.weight.data = original
        rows.append({"layer": name, "kind": kind, "value": value, "metric": m, "drop": baseline - m,
                     "output_error": err})
        if resume is not None:
            _append_line(Path(resume), rows[-1])
    return SensitivityResult(baseline=baseline, metric=metric_name, rows=rows)


def _scan_key(model: nn.Module, plan: list, metric_name: str, baseline: float) -> str:
    """What the scan's points depend on: the weights, the points asked for, the metric and its baseline value."""
    h = hashlib.sha256(json.dumps([plan, metric_name, baseline]).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _open_progress(path: Path, key: str) -> dict[tuple, dict[str, Any]]:
    """The finished points a previous run of the same scan left in ``path``; rewrites the file to its intact
    lines (a kill may have torn the last one) under ``key``, so that new points append cleanly."""
    rows: list[dict[str, Any]] = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    if lines and _json_line(lines[0]) == {"key": key}:
        rows = [r for r in map(_json_line, lines[1:]) if isinstance(r, dict) and {"layer", "kind", "value"} <= set(r)]
    atomic_write(path, "".join(json.dumps(x) + "\n" for x in [{"key": key}, *rows]).encode())
    return {(r["layer"], r["kind"], r["value"]): r for r in rows}


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _append_line(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
