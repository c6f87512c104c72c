"""Quantization benchmark: LeNet-5 on MNIST.

Targets (quantization issue), against a float LeNet-5 trained here (cached in OUT as a .slim):
- 4-bit QAT (LSQ weights, 8-bit activations): accuracy drop <= 0.3 points, bytes on disk >= 8x fewer;
- ternary weights, first/last layer 8-bit: drop <= 1.0 point, bytes on disk >= 14x fewer;
- binary weights, first/last layer 8-bit: drop <= 2.0 points;
- mixed precision at a size budget: the plan, its accuracy and size (target: the plan fits the budget).

Accuracy is top-1 on the MNIST test split; "points" are percentage points. Bytes on disk are those of
``torchslim.save`` files. ``bytes_no_deflate`` is the same file as if the bit-packed codes had not been
deflated (the ``intpack`` encoding deflates packed codes when that is smaller), to show both effects.

Sections are functions ``section(ctx) -> dict`` listed in SECTIONS; each result may hold a ``targets``
mapping ``{name: {"value": measured, "met": bool}}`` and ``rows`` for the printed table.
"""

from __future__ import annotations

import math
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _quant_ptq import section_ptq  # noqa: E402
from _common import environment, parse_args, print_table, write_json  # noqa: E402

from torchslim import TrainConfig, WeightSharing, quantize, train  # noqa: E402
from torchslim.data import Splits, mnist  # noqa: E402
from torchslim.export.checkpoint import load, read_manifest, save  # noqa: E402
from torchslim.metrics import evaluate, measure_latency  # noqa: E402
from torchslim.models import LeNet5, LeNet300  # noqa: E402
from torchslim.quantization.lowbit import BinaryWeights, TernaryWeights, apply_binary, apply_ternary  # noqa: E402
from torchslim.quantization.mixed import MixedPrecision, quantize_mixed  # noqa: E402
from torchslim.quantization.codecs import encode_intpack  # noqa: E402
from torchslim.quantization.qat import QAT, apply_qat  # noqa: E402

NAME = "quantization"


@dataclass
class Context:
    """What every section gets: the data, the float baseline and its measurements."""

    args: Any
    data: Splits
    baseline: nn.Module
    baseline_accuracy: float
    fp32_bytes: int
    quick: bool
    example: tuple[torch.Tensor]

    def epochs(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    def measure(self, name: str, model: nn.Module, seconds: float) -> dict[str, Any]:
        """Accuracy, drop, bytes on disk (with and without deflate), ratio and latency of ``model``."""
        acc = evaluate(model, self.data.test)
        size, raw = file_sizes(model)
        # Interleaved with the baseline so that load from other processes hits both alike.
        base_ms, ms = [], []
        for _ in range(3):
            base_ms.append(measure_latency(self.baseline, self.example, repeats=10))
            ms.append(measure_latency(model, self.example, repeats=10))
        return {"model": name, "accuracy": acc, "drop_points": 100 * (self.baseline_accuracy - acc),
                "bytes": size, "size_ratio": self.fp32_bytes / size, "bytes_no_deflate": raw,
                "ratio_no_deflate": self.fp32_bytes / raw, "latency_ms_b64": min(ms),
                "latency_vs_float": min(ms) / min(base_ms), "seconds": seconds}


def file_sizes(model: nn.Module) -> tuple[int, int]:
    """Bytes of the saved file, and bytes it would have with intpack codes bit-packed but not deflated."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save(model, Path(tmp) / "m.slim")
        size = path.stat().st_size
        entries = read_manifest(path)["tensors"]
    state = model.state_dict()
    extra = 0
    for name, entry in entries.items():
        if entry.get("encoding") == "intpack" and entry.get("zlib"):
            n = math.prod(entry["shape"])
            raw = math.ceil(n / 5) if entry["width"] == "trit" else math.ceil(n * int(entry["width"]) / 8)
            parts, _ = encode_intpack(state[name].cpu())
            extra += raw - parts["data"].numel()
    return size, size + extra


def train_baseline(data: Splits, quick: bool, out: Path) -> tuple[nn.Module, float, float]:
    """The float LeNet-5, trained once (seeded) and cached in OUT; returns (model, accuracy, training seconds)."""
    epochs = 2.0 if quick else 4.0
    path = out / f"lenet5_fp32{'_quick' if quick else ''}.slim"
    recipe = {"epochs": epochs, "lr": 1e-3, "seed": 0, "train_size": len(data.train.dataset)}
    if path.exists():
        manifest = read_manifest(path)
        if manifest["metrics"].get("recipe") == recipe:
            model = load(path).eval()
            return model, evaluate(model, data.test), float(manifest["metrics"].get("train_seconds", 0.0))
    torch.manual_seed(0)
    model = LeNet5()
    t0 = time.perf_counter()
    train(model, data.train, TrainConfig(epochs=epochs, lr=1e-3), val_loader=data.val)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, data.test)
    save(model.eval(), path, metrics={"recipe": recipe, "test_accuracy": acc, "train_seconds": seconds}, overwrite=True)
    return model.eval(), acc, seconds


# ---------------------------------------------------------------------------------------------- sections


def _timed(fn: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
    t0 = time.perf_counter()
    model = fn()
    return model, time.perf_counter() - t0


def section_qat4(ctx: Context) -> dict:
    cfg = QAT(bits=4, activation_bits=8, learned_step=True,
              train=TrainConfig(epochs=ctx.epochs(1, 1), lr=1e-4))
    model, seconds = _timed(lambda: apply_qat(ctx.baseline, cfg, data=ctx.data.train, val_data=ctx.data.val,
                                              calibration_data=ctx.data.train))
    row = ctx.measure("qat 4-bit w / 8-bit a (LSQ)", model, seconds)
    return {"config": cfg.to_dict(), "rows": [row], "targets": {
        "qat4_drop_points<=0.3": {"value": row["drop_points"], "met": row["drop_points"] <= 0.3},
        "qat4_size_ratio>=8": {"value": row["size_ratio"], "met": row["size_ratio"] >= 8},
    }}


def section_ternary(ctx: Context) -> dict:
    cfg = TernaryWeights(keep_first_last=True, first_last_bits=8, train=TrainConfig(epochs=ctx.epochs(2, 1), lr=1e-3))
    model, seconds = _timed(lambda: apply_ternary(ctx.baseline, cfg, data=ctx.data.train, val_data=ctx.data.val))
    row = ctx.measure("ternary (first/last 8-bit)", model, seconds)
    return {"config": cfg.to_dict(), "rows": [row], "targets": {
        "ternary_drop_points<=1.0": {"value": row["drop_points"], "met": row["drop_points"] <= 1.0},
        "ternary_size_ratio>=14": {"value": row["size_ratio"], "met": row["size_ratio"] >= 14},
    }}


def section_binary(ctx: Context) -> dict:
    cfg = BinaryWeights(keep_first_last=True, first_last_bits=8, train=TrainConfig(epochs=ctx.epochs(2, 1), lr=1e-3))
    model, seconds = _timed(lambda: apply_binary(ctx.baseline, cfg, data=ctx.data.train, val_data=ctx.data.val))
    row = ctx.measure("binary (first/last 8-bit)", model, seconds)
    return {"config": cfg.to_dict(), "rows": [row], "targets": {
        "binary_drop_points<=2.0": {"value": row["drop_points"], "met": row["drop_points"] <= 2.0},
    }}


def section_mixed(ctx: Context) -> dict:
    cfg = MixedPrecision(budget=0.1, objective="size", candidate_bits=(2, 3, 4, 8), metric="output_error",
                         finetune=TrainConfig(epochs=ctx.epochs(1, 1), lr=1e-4))
    t0 = time.perf_counter()
    model, plan = quantize_mixed(ctx.baseline, cfg, data=ctx.data.train, val_data=ctx.data.val,
                                 calibration_data=ctx.data.val)
    seconds = time.perf_counter() - t0
    row = ctx.measure(f"mixed {plan.bits}", model, seconds)
    row["plan_fraction"] = plan.fraction
    return {"config": cfg.to_dict(), "plan": plan.to_dict(), "rows": [row], "targets": {
        "mixed_plan_fraction<=budget(0.1)": {"value": plan.fraction, "met": plan.fraction <= cfg.budget},
    }}


def section_sharing(ctx: Context) -> dict:
    """5-bit k-means weight sharing on an unpruned LeNet-300-100 (target: >= 6x smaller, <= 0.1 point drop)."""
    torch.manual_seed(0)
    model = LeNet300()
    t0 = time.perf_counter()
    train(model, ctx.data.train, TrainConfig(epochs=ctx.epochs(4, 2), lr=1e-3), val_loader=ctx.data.val)
    base_seconds = time.perf_counter() - t0
    base_acc = evaluate(model, ctx.data.test)
    fp32 = file_sizes(model)[0]
    cfg = WeightSharing(bits=5, finetune=TrainConfig(epochs=ctx.epochs(1, 0.5), lr=1e-4))
    shared, seconds = _timed(lambda: quantize(model, cfg, data=ctx.data.train, val_data=ctx.data.val))
    acc = evaluate(shared, ctx.data.test)
    size = file_sizes(shared)[0]
    drop = 100 * (base_acc - acc)
    row = {"model": "LeNet-300-100 5-bit weight sharing", "accuracy": acc, "drop_points": drop, "bytes": size,
           "size_ratio": fp32 / size, "seconds": seconds}
    return {"config": cfg.to_dict(), "baseline": {"accuracy": base_acc, "bytes": fp32, "seconds": base_seconds},
            "rows": [row], "targets": {
                "sharing5_lenet300_size_ratio>=6": {"value": fp32 / size, "met": fp32 / size >= 6},
                "sharing5_lenet300_drop_points<=0.1": {"value": drop, "met": drop <= 0.1},
            }}


SECTIONS: list[tuple[str, Callable[[Context], dict]]] = [
    ("ptq", section_ptq),  # static/dynamic/weight-only PTQ, int8 speed, ONNX export (benchmarks/_quant_ptq.py)
    ("qat4", section_qat4),
    ("ternary", section_ternary),
    ("binary", section_binary),
    ("mixed", section_mixed),
    ("sharing", section_sharing),
]

COLUMNS = ["model", "accuracy", "drop_points", "bytes", "size_ratio", "ratio_no_deflate", "latency_ms_b64",
           "latency_vs_float", "seconds"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(NAME, __doc__, argv, sections=[name for name, _ in SECTIONS])
    out = Path(args.out)
    data = mnist(args.data_dir, subset=12_000 if args.quick else None)
    baseline, base_acc, base_seconds = train_baseline(data, args.quick, out)
    ctx = Context(args=args, data=data, baseline=baseline, baseline_accuracy=base_acc,
                  fp32_bytes=file_sizes(baseline)[0], quick=args.quick, example=data.example_inputs(64))
    base_row = {"model": "float32 baseline", "accuracy": base_acc, "drop_points": 0.0, "bytes": ctx.fp32_bytes,
                "size_ratio": 1.0, "ratio_no_deflate": 1.0,
                "latency_ms_b64": min(measure_latency(baseline, ctx.example, repeats=10) for _ in range(3)),
                "latency_vs_float": 1.0, "seconds": base_seconds}
    result: dict[str, Any] = {"environment": environment(args), "baseline": base_row, "sections": {}, "targets": {}}
    previous = out / f"{NAME}.json"
    if args.only and previous.exists():
        # Sections not re-run keep their earlier figures; their environment stays recorded with them.
        old = json.loads(previous.read_text())
        result["sections"], result["targets"] = old.get("sections", {}), old.get("targets", {})
        result["earlier_environment"] = old.get("environment")
    rows = [base_row]
    for name, section in SECTIONS:
        if args.only and name not in args.only:
            continue
        print(f"== {name}", flush=True)
        torch.manual_seed(0)
        data.train.generator.manual_seed(0)  # same shuffling whether or not the baseline came from the cache
        res = section(ctx)
        result["sections"][name] = res
        result["targets"].update(res.get("targets", {}))
        rows.extend(res.get("rows", []))
        print_table(res.get("rows", []), COLUMNS)
        write_json(args, NAME, result)  # partial results survive a later failure
    print("\n== summary (LeNet-5, MNIST test accuracy)")
    print_table(rows, COLUMNS)
    print()
    print_table([{"target": k, "value": v["value"], "met": v["met"]} for k, v in result["targets"].items()],
                ["target", "value", "met"])
    path = write_json(args, NAME, result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
