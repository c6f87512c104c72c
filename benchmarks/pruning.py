"""Pruning benchmark: LeNet-5 pruning pipeline targets and real structured speed-ups.

Targets (foundation issue):
- recipes/lenet5_structured_unstructured.yaml (the first demo): accuracy drop <= 1.0 point, non-zero parameters
  >= 8x fewer, bytes on disk >= 4x smaller;
- SmallResNet, structured 50% channels: MACs >= 2.5x fewer, CPU latency (batch 64) >= 1.8x lower,
  pruned outputs equal to the masked original (max abs diff < 1e-5) before fine-tuning.
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parse_args, print_table, write_json  # noqa: E402

import torchslim  # noqa: E402
from torchslim.metrics import count_macs, count_params, measure_latency  # noqa: E402
from torchslim.models import SmallMobileNet, SmallResNet  # noqa: E402
from torchslim.pipeline.commands import run_recipe  # noqa: E402
from torchslim.pruning.structured import structured_prune, masked_like  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "lenet5_structured_unstructured.yaml"


def demo_section(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = run_recipe(RECIPE, Path(tmp) / "out", log=lambda s: None)
        seconds = time.perf_counter() - t0
    r = report["ratios"]
    drop_points = 100 * report["accuracy_drop"]
    return {
        "recipe": RECIPE.name,
        "baseline_accuracy": report["baseline"]["accuracy"],
        "compressed_accuracy": report["compressed"]["accuracy"],
        "accuracy_drop_points": drop_points,
        "nonzero_ratio": r["nonzero_params"],
        "size_ratio": r["size"],
        "macs_ratio": r["macs"],
        "latency_ratio": r["latency"],
        "seconds": seconds,
        "targets": {
            "accuracy_drop_points<=1.0": {"value": drop_points, "met": drop_points <= 1.0},
            "nonzero_ratio>=8": {"value": r["nonzero_params"], "met": r["nonzero_params"] >= 8},
            "size_ratio>=4": {"value": r["size"], "met": r["size"] >= 4},
        },
    }


def _randomise_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Give BN layers non-trivial running stats and affine params so equality checks mean something."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


def structured_section(name: str, model: nn.Module, args) -> dict:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 28, 28)
    _randomise_bn(model, x[:16])
    pruned = copy.deepcopy(model)
    summary = structured_prune(pruned, torchslim.StructuredPruning(ratio=0.5, importance="l1"), (x,))
    reference = masked_like(model, summary)
    with torch.no_grad():
        diff = (pruned(x) - reference(x)).abs().max().item()
    repeats = 10 if args.quick else 40
    # Interleave the two models so machine noise hits both alike.
    lat_base, lat_pruned = [], []
    for _ in range(3):
        lat_base.append(measure_latency(model, (x,), repeats=repeats))
        lat_pruned.append(measure_latency(pruned, (x,), repeats=repeats))
    base_ms, pruned_ms = min(lat_base), min(lat_pruned)
    macs = count_macs(model, (x,)) / count_macs(pruned, (x,))
    params = count_params(model)[0] / count_params(pruned)[0]
    return {"model": name, "params_ratio": params, "macs_ratio": macs, "latency_base_ms": base_ms,
            "latency_pruned_ms": pruned_ms, "latency_ratio": base_ms / pruned_ms, "max_abs_diff": diff,
            "skipped_groups": len(summary["skipped"])}


def main(argv=None) -> int:
    args = parse_args("pruning", __doc__, argv)
    result = {"environment": environment(args)}
    print(f"== {RECIPE.name} (LeNet-5 on digits: structured + unstructured pruning with fine-tuning)")
    demo = demo_section(args)
    result["demo"] = demo
    print_table([{"target": k, "value": v["value"], "met": v["met"]} for k, v in demo["targets"].items()],
                ["target", "value", "met"])
    print(f"accuracy {demo['baseline_accuracy']:.4f} -> {demo['compressed_accuracy']:.4f}, "
          f"latency ratio {demo['latency_ratio']:.2f}x, {demo['seconds']:.0f} s")

    print("\n== structured pruning at 50% channels, batch 64, CPU")
    rows = [structured_section("resnet_small", SmallResNet(in_channels=1, widths=(32, 64, 128)), args),
            structured_section("mobilenet_small", SmallMobileNet(in_channels=1, width=16), args)]
    result["structured"] = rows
    print_table(rows, ["model", "params_ratio", "macs_ratio", "latency_base_ms", "latency_pruned_ms",
                       "latency_ratio", "max_abs_diff"])
    res = rows[0]
    result["structured_targets"] = {
        "resnet_macs_ratio>=2.5": {"value": res["macs_ratio"], "met": res["macs_ratio"] >= 2.5},
        "resnet_latency_ratio>=1.8": {"value": res["latency_ratio"], "met": res["latency_ratio"] >= 1.8},
        "resnet_max_abs_diff<1e-5": {"value": res["max_abs_diff"], "met": res["max_abs_diff"] < 1e-5},
    }
    print_table([{"target": k, "value": v["value"], "met": v["met"]} for k, v in result["structured_targets"].items()],
                ["target", "value", "met"])
    path = write_json(args, "pruning", result)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
