"""Benchmark: knowledge distillation and low-rank decomposition on MNIST.

    python benchmarks/distill_lowrank.py [--quick] [--data-dir DIR] [--out DIR]

Sections (each target gets a ``met`` flag computed from the measured numbers):
  (a) LeNet-5 at 1/4 width trained with distillation from the full LeNet-5 vs. the same student trained on
      labels only: same data, epochs and initial weights, 3 seeds; target: distilled mean accuracy >
      labels-only mean. The teacher learns from the whole train split, the students from a 10k-sample
      transfer set; the same comparison on the whole train split is reported alongside (no target).
  (b) Tucker-2 on SmallResNet, fine-tuned with distillation from the original; targets: MACs >= 2x fewer,
      test accuracy drop <= 1.0 point.
  (c) SVD on LeNet-300-100, fine-tuned with distillation from the original; targets: parameters >= 3x fewer,
      test accuracy drop <= 0.3 point.
Writes OUT/distill_lowrank.json and prints a table. Accuracies are on the MNIST test split (10,000 images;
2,000 in --quick); training uses the train split (or a seeded random subset of it, stated in the JSON).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, parse_args, print_table, write_json  # noqa: E402

from torchslim.data import default_data_dir, mnist  # noqa: E402
from torchslim.distillation import Distillation, distill  # noqa: E402
from torchslim.core.errors import DataError  # noqa: E402
from torchslim.core.history import history  # noqa: E402
from torchslim.lowrank import SVD, Tucker, decompose  # noqa: E402
from torchslim.metrics import count_macs, count_params, evaluate  # noqa: E402
from torchslim.models import LeNet5, LeNet300, SmallResNet  # noqa: E402
from torchslim.training.train import TrainConfig, train  # noqa: E402

# Settings of the full run and of --quick. Sizes are picked to fit ~20 minutes on 2 otherwise idle CPU cores.
# (a): the teacher learns from the whole train split; the students learn from a smaller labelled "transfer
# set" (Hinton et al. 2015), where soft targets carry information the labels lack. The same comparison on
# the whole train split is reported too ("full_data", no target), where this 27k-parameter student is
# capacity-bound rather than data-bound.
FULL = {
    "a": {"teacher_samples": None, "teacher_epochs": 5, "student_samples": 10000, "student_epochs": 10,
          "seeds": [0, 1, 2], "full_data_epochs": 4},
    "b": {"train_samples": 12000, "epochs": 2, "finetune_epochs": 1, "ratio": 0.4},
    "c": {"train_samples": None, "epochs": 6, "finetune_epochs": 3, "ratio": 0.3},
    "test_samples": None,
}
QUICK = {
    "a": {"teacher_samples": 6000, "teacher_epochs": 2, "student_samples": 3000, "student_epochs": 3,
          "seeds": [0, 1, 2], "full_data_epochs": None},
    "b": {"train_samples": 2560, "epochs": 2, "finetune_epochs": 1, "ratio": 0.4},
    "c": {"train_samples": 20000, "epochs": 2, "finetune_epochs": 1, "ratio": 0.3},
    "test_samples": 2000,
}
BATCH = 128


def _subset_loader(train_loader: DataLoader, n: int | None, seed: int) -> DataLoader:
    """A shuffling loader over the first ``n`` training samples (the split is already a random permutation)."""
    x, y = train_loader.dataset.tensors
    if n is not None:
        x, y = x[:n], y[:n]
    return DataLoader(TensorDataset(x, y), batch_size=BATCH, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _limit(loader: DataLoader, n: int | None) -> DataLoader:
    if n is None:
        return loader
    x, y = loader.dataset.tensors
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=512)


def _tc(epochs: float, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, lr=lr, device="cpu")


def _pct(acc: float) -> float:
    return round(100 * acc, 2)


def _students(data, teacher, samples: int | None, epochs: float, seeds: list[int], kd: Distillation,
              test) -> dict[str, Any]:
    """Labels-only vs distilled LeNet-5 (1/4 width): per seed the same initial weights, data and epochs."""
    kd = kd.replace(train=_tc(epochs, 2e-3))
    runs = []
    for seed in seeds:
        row: dict[str, Any] = {"seed": seed}
        for variant in ("labels_only", "distilled"):
            torch.manual_seed(seed)
            student = LeNet5(width=0.25)
            loader = _subset_loader(data.train, samples, seed)
            if variant == "labels_only":
                train(student, loader, kd.train)
            else:
                distill(student, kd, teacher=teacher, data=loader, inplace=True)
            row[variant] = _pct(evaluate(student, test))
        runs.append(row)
        print(f"      seed {seed}: labels only {row['labels_only']:.2f}%, distilled {row['distilled']:.2f}%",
              flush=True)
    mean_kd = statistics.mean(r["distilled"] for r in runs)
    mean_lb = statistics.mean(r["labels_only"] for r in runs)
    return {
        "train_samples": samples or len(data.train.dataset), "epochs": epochs, "runs": runs,
        "mean_labels_only": round(mean_lb, 3), "mean_distilled": round(mean_kd, 3),
        "gain_points": round(mean_kd - mean_lb, 3),
        "seeds_won_by_distillation": sum(r["distilled"] > r["labels_only"] for r in runs),
    }


def section_distillation(data, settings: dict, test) -> dict[str, Any]:
    s = settings
    t0 = time.time()
    torch.manual_seed(1000)
    teacher = LeNet5()
    train(teacher, _subset_loader(data.train, s["teacher_samples"], 1000), _tc(s["teacher_epochs"], 2e-3))
    teacher.eval()
    kd = Distillation(temperature=4.0, alpha=0.9, cache_teacher=True)
    out: dict[str, Any] = {
        "teacher": "LeNet5(width=1.0)", "student": "LeNet5(width=0.25)",
        "teacher_params": count_params(teacher)[0], "student_params": count_params(LeNet5(width=0.25))[0],
        "teacher_train_samples": s["teacher_samples"] or len(data.train.dataset),
        "teacher_epochs": s["teacher_epochs"], "teacher_accuracy": _pct(evaluate(teacher, test)),
        "distillation": kd.to_dict(),
        "note": "students learn from a seeded random subset of the train split (a labelled transfer set); "
                "'full_data' repeats the comparison on the whole train split (no target)",
    }
    print(f"    transfer set of {s['student_samples']} samples, {s['student_epochs']} epochs", flush=True)
    main = _students(data, teacher, s["student_samples"], s["student_epochs"], s["seeds"], kd, test)
    out.update(main)
    if s["full_data_epochs"]:
        print(f"    whole train split, {s['full_data_epochs']} epochs", flush=True)
        out["full_data"] = _students(data, teacher, None, s["full_data_epochs"], s["seeds"], kd, test)
    out["target"] = "mean accuracy of the distilled student > mean of the labels-only student (same seeds/epochs)"
    out["met"] = main["mean_distilled"] > main["mean_labels_only"]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def section_tucker(data, settings: dict, test, example) -> dict[str, Any]:
    s = settings
    t0 = time.time()
    torch.manual_seed(0)
    model = SmallResNet()
    loader = _subset_loader(data.train, s["train_samples"], 0)
    train(model, loader, _tc(s["epochs"], 2e-3))
    model.eval()
    acc0 = evaluate(model, test)
    # The stem (1 -> 32 channels) has no input mode to compress and costs 0.3% of the MACs.
    config = Tucker(ratio=s["ratio"], exclude=("stem.*",), progress=False)
    small = decompose(model, config, example_inputs=example)
    report = history(small)[-1]["report"]
    acc_raw = evaluate(small, test)
    distill(small, Distillation(temperature=4.0, alpha=0.5, train=_tc(s["finetune_epochs"], 1e-3)), teacher=model,
            data=loader, inplace=True)
    small.eval()
    acc1 = evaluate(small, test)
    macs0, macs1 = count_macs(model, example), count_macs(small, example)
    p0, p1 = count_params(model)[0], count_params(small)[0]
    drop = _pct(acc0) - _pct(acc1)
    macs_ratio = macs0 / macs1
    return {
        "model": "SmallResNet(widths=(32, 64, 128), blocks=(2, 2, 2))",
        "train_samples": s["train_samples"] or len(data.train.dataset),
        "note": "trained on a random subset of the MNIST train split to fit the 2-core CPU budget",
        "epochs": s["epochs"], "finetune_epochs": s["finetune_epochs"], "decomposition": config.to_dict(),
        "macs_before": macs0, "macs_after": macs1, "macs_ratio": round(macs_ratio, 3),
        "params_before": p0, "params_after": p1, "params_ratio": round(p0 / p1, 3),
        "accuracy_original": _pct(acc0), "accuracy_decomposed_before_finetune": _pct(acc_raw),
        "accuracy_after_finetune": _pct(acc1), "accuracy_drop_points": round(drop, 2),
        "layers": {n: {k: e[k] for k in ("rank", "params_before", "params_after", "macs_before", "macs_after",
                                         "error", "skipped")} for n, e in report.items()},
        "targets": {"macs_ratio >= 2": macs_ratio >= 2, "accuracy drop <= 1.0 point": drop <= 1.0},
        "met": macs_ratio >= 2 and drop <= 1.0,
        "seconds": round(time.time() - t0, 1),
    }


def section_svd(data, settings: dict, test, example) -> dict[str, Any]:
    s = settings
    t0 = time.time()
    torch.manual_seed(0)
    model = LeNet300()
    loader = _subset_loader(data.train, s["train_samples"], 0)
    train(model, loader, _tc(s["epochs"], 1e-3))
    model.eval()
    acc0 = evaluate(model, test)
    config = SVD(ratio=s["ratio"], exclude=("fc3",), progress=False)
    small = decompose(model, config, example_inputs=example)
    report = history(small)[-1]["report"]
    acc_raw = evaluate(small, test)
    distill(small, Distillation(temperature=4.0, alpha=0.5, train=_tc(s["finetune_epochs"], 5e-4)), teacher=model,
            data=loader, inplace=True)
    small.eval()
    acc1 = evaluate(small, test)
    p0, p1 = count_params(model)[0], count_params(small)[0]
    drop = _pct(acc0) - _pct(acc1)
    ratio = p0 / p1
    return {
        "model": "LeNet300", "train_samples": s["train_samples"] or len(data.train.dataset),
        "epochs": s["epochs"], "finetune_epochs": s["finetune_epochs"], "decomposition": config.to_dict(),
        "params_before": p0, "params_after": p1, "params_ratio": round(ratio, 3),
        "macs_before": count_macs(model, example), "macs_after": count_macs(small, example),
        "accuracy_original": _pct(acc0), "accuracy_decomposed_before_finetune": _pct(acc_raw),
        "accuracy_after_finetune": _pct(acc1), "accuracy_drop_points": round(drop, 2),
        "layers": {n: {k: e[k] for k in ("rank", "params_before", "params_after", "error", "skipped")}
                   for n, e in report.items()},
        "targets": {"params_ratio >= 3": ratio >= 3, "accuracy drop <= 0.3 point": drop <= 0.3},
        "met": ratio >= 3 and drop <= 0.3,
        "seconds": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args("distill_lowrank", __doc__, argv)
    settings = QUICK if args.quick else FULL
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        data = mnist(data_dir, batch_size=BATCH)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    test = _limit(data.test, settings["test_samples"])
    example = data.example_inputs(1)
    started = time.time()
    result: dict[str, Any] = {"environment": environment(args), "dataset": "mnist", "data_dir": str(data_dir),
                              "test_samples": len(test.dataset)}
    print("== (a) distillation: LeNet-5 1/4 width student, labels only vs distilled", flush=True)
    a = result["distillation"] = section_distillation(data, settings["a"], test)
    print("== (b) Tucker-2 on SmallResNet, fine-tuned by distillation from the original", flush=True)
    b = result["tucker_resnet"] = section_tucker(data, settings["b"], test, example)
    print("== (c) SVD on LeNet-300-100, fine-tuned by distillation from the original", flush=True)
    c = result["svd_lenet300"] = section_svd(data, settings["c"], test, example)
    result["targets"] = {
        "distilled_mean>labels_only_mean": {"value": a["gain_points"], "met": a["met"]},
        "tucker_macs_ratio>=2": {"value": b["macs_ratio"], "met": b["macs_ratio"] >= 2},
        "tucker_accuracy_drop_points<=1.0": {"value": b["accuracy_drop_points"],
                                             "met": b["accuracy_drop_points"] <= 1.0},
        "svd_params_ratio>=3": {"value": c["params_ratio"], "met": c["params_ratio"] >= 3},
        "svd_accuracy_drop_points<=0.3": {"value": c["accuracy_drop_points"],
                                          "met": c["accuracy_drop_points"] <= 0.3},
    }
    result["seconds"] = round(time.time() - started, 1)

    rows = [{"model": "LeNet5 x1/4, " + name, "labels_only": r["mean_labels_only"], "distilled": r["mean_distilled"],
             "gain_points": r["gain_points"], "seeds_won": f"{r['seeds_won_by_distillation']}/{len(r['runs'])}"}
            for name, r in [("transfer set", a), ("whole train split", a.get("full_data"))] if r is not None]
    print(f"\nteacher LeNet5 accuracy {a['teacher_accuracy']:.2f}%")
    print_table(rows, ["model", "labels_only", "distilled", "gain_points", "seeds_won"])
    print()
    print_table([{"model": "SmallResNet, Tucker-2", "acc_before": b["accuracy_original"],
                  "acc_decomposed": b["accuracy_decomposed_before_finetune"], "acc_finetuned": b["accuracy_after_finetune"],
                  "params_ratio": b["params_ratio"], "macs_ratio": b["macs_ratio"]},
                 {"model": "LeNet300, SVD", "acc_before": c["accuracy_original"],
                  "acc_decomposed": c["accuracy_decomposed_before_finetune"], "acc_finetuned": c["accuracy_after_finetune"],
                  "params_ratio": c["params_ratio"], "macs_ratio": c["macs_before"] / c["macs_after"]}],
                ["model", "acc_before", "acc_decomposed", "acc_finetuned", "params_ratio", "macs_ratio"])
    print()
    print_table([{"target": k, "value": v["value"], "met": v["met"]} for k, v in result["targets"].items()],
                ["target", "value", "met"])
    path = write_json(args, "distill_lowrank", result)
    print(f"\nwrote {path} ({result['seconds']:.0f} s{', quick' if args.quick else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
