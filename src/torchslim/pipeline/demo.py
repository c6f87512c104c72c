"""The main job: train LeNet-5 on the embedded digits data, compress it, write the report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from ..data import digits
from ..errors import TorchslimError
from ..export.checkpoint import load, save
from ..metrics import compare_latency, evaluate
from ..models import LeNet5
from ..pruning import Schedule, StructuredPruning, UnstructuredPruning
from ..report import build_report, measure, write_report
from .runner import run_stages
from .train import TrainConfig, default_device, train


def demo_stages(quick: bool = False) -> list:
    """Structured (half the channels, iterative) then unstructured (gradual to 80% zeros) pruning."""
    ft = TrainConfig(epochs=1 if quick else 3, lr=1e-3)
    return [
        ("structured", StructuredPruning(ratio=0.5, importance="l1",
                                         schedule=Schedule("iterative", steps=2, finetune=ft))),
        ("unstructured", UnstructuredPruning(sparsity=0.8, scope="global",
                                             schedule=Schedule("gradual", steps=4,
                                                               finetune=TrainConfig(epochs=2 if quick else 6,
                                                                                    lr=1e-3)))),
    ]


def run_demo(out_dir: str | Path, *, seed: int = 0, overwrite: bool = False, quick: bool = False,
             log: Callable[[str], None] = print) -> dict:
    """Train, compress, save and report; returns the report dict."""
    out = Path(out_dir)
    ckpt = out / "model.slim"
    if not overwrite:
        for p in (ckpt, out / "report.json"):
            if p.exists():
                raise TorchslimError(f"{p} exists; pass --overwrite to replace the demo's outputs")
    torch.manual_seed(seed)
    data = digits(seed=seed)
    example = data.example_inputs(64)
    model = LeNet5()
    t0 = time.perf_counter()
    log("training LeNet-5 on digits")
    train(model, data.train, TrainConfig(epochs=4 if quick else 12, lr=2e-3), val_loader=data.val)
    model.cpu()
    log(f"  trained in {time.perf_counter() - t0:.1f} s")
    baseline = measure(model, example, data.test, latency=False)
    log(f"  baseline accuracy {baseline['accuracy']:.4f}, {baseline['size_bytes']:,} bytes on disk")

    compressed_model, stages = run_stages(model, demo_stages(quick), data, example, log=log)
    compressed_model.cpu()
    compressed = measure(compressed_model, example, data.test, latency=False)
    latency = compare_latency({"baseline": model, "compressed": compressed_model}, example)
    baseline["latency_ms"], compressed["latency_ms"] = latency["baseline"], latency["compressed"]
    report = build_report(model_name="lenet5", dataset="digits", device=str(default_device()),
                          baseline=baseline, compressed=compressed, stages=stages, checkpoint=ckpt.name)
    save(compressed_model, ckpt, history=[s["config"] for s in stages],
         metrics={"accuracy": compressed["accuracy"]}, overwrite=True)
    reloaded = evaluate(load(ckpt), data.test)
    if abs(reloaded - compressed["accuracy"]) > 1e-9:
        raise TorchslimError(f"{ckpt} reloads to accuracy {reloaded:.4f}, expected {compressed['accuracy']:.4f}")
    # The report's size is the real file just written, not the in-memory estimate.
    report["compressed"]["size_bytes"] = ckpt.stat().st_size
    report["ratios"]["size"] = baseline["size_bytes"] / report["compressed"]["size_bytes"]
    write_report(report, out)
    return report
