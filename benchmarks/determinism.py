"""Determinism: every example recipe that trains on digits, run twice in fresh processes with the same seed and
thread count, must give byte-identical model.slim files and identical report metrics.

    python benchmarks/determinism.py --quick            # 1 epoch per training run
    python benchmarks/determinism.py --recipes lenet5_structured lenet5_prune_quantize_finetune
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from _common import ROOT, environment, parse_args, print_table, write_json

RECIPES = ROOT / "recipes"
# Measured in wall-clock time: they differ from run to run by nature.
TIMED = ("latency_ms", "latency", "latency_noise", "seconds", "time_s", "date")


def digits_recipes() -> list[str]:
    """The example recipes whose data is the bundled digits (no download)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml")
                  if (yaml.safe_load(p.read_text()).get("data") or {}).get("builtin") == "digits")


def quick(node, epochs: float | None):
    """``node`` with every ``epochs`` capped at ``epochs`` (None: unchanged)."""
    if isinstance(node, dict):
        return {k: (min(v, epochs) if k == "epochs" and epochs is not None else quick(v, epochs))
                for k, v in node.items()}
    if isinstance(node, list):
        return [quick(v, epochs) for v in node]
    return node


def untimed(node):
    if isinstance(node, dict):
        return {k: untimed(v) for k, v in node.items() if k not in TIMED}
    if isinstance(node, list):
        return [untimed(v) for v in node]
    return node


def differences(a, b, where: str = "") -> list[str]:
    """Paths (``a.b[2]``) where the JSON values ``a`` and ``b`` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where or "."]


def run_child(out: Path, names: list[str], epochs: float | None) -> None:
    """Run the recipes in this process (a fresh one per repetition) and print their fingerprints as JSON."""
    from torchslim.pipeline.commands import run_recipe
    from torchslim.pipeline.recipe import recipe_from_dict

    result = {}
    for name in names:
        path = RECIPES / f"{name}.yaml"
        recipe = recipe_from_dict(quick(yaml.safe_load(path.read_text()), epochs), str(path), RECIPES)
        report = run_recipe(recipe, out / name, overwrite=True, log=lambda s: None)
        result[name] = {"sha256": hashlib.sha256((out / name / "model.slim").read_bytes()).hexdigest(),
                        "report": untimed(report)}
    print(json.dumps(result))


def run_twice(names: list[str], threads: int, epochs: float | None) -> dict[str, dict]:
    """Run ``names`` in two fresh processes; per recipe whether the model files and the reports are identical."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            cmd = [sys.executable, __file__, "--child", str(Path(tmp) / str(i)), "--threads", str(threads),
                   "--epochs", str(epochs), *names]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {}
    for n in names:
        diff = differences(runs[0][n]["report"], runs[1][n]["report"])
        rows[n] = {"same_model": runs[0][n]["sha256"] == runs[1][n]["sha256"], "same_report": not diff,
                   "report_differs_at": diff[:5]}
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        import torch

        out, rest = Path(argv[1]), argv[2:]
        torch.set_num_threads(int(rest[1]))
        epochs = None if rest[3] == "None" else float(rest[3])
        run_child(out, rest[4:], epochs)
        return
    names = []
    if "--recipes" in argv:
        i = argv.index("--recipes")
        names, argv = argv[i + 1:], argv[:i]
    args = parse_args("determinism", __doc__.splitlines()[0], argv)
    named = bool(names)
    names = names or digits_recipes()
    rows = run_twice(names, args.threads, 1 if args.quick else None)
    print_table([{"recipe": n, **r} for n, r in rows.items()], ["recipe", "same_model", "same_report",
                                                                  "report_differs_at"])
    env = environment(args)
    rows = {n: {**r, "date": env["date"], "quick": env["quick"], "threads": args.threads} for n, r in rows.items()}
    previous = Path(args.out) / "determinism.json"
    if named and previous.exists():  # named recipes are added to (or replace theirs in) the last run's table
        rows = {**json.loads(previous.read_text()).get("recipes", {}), **rows}
    write_json(args, "determinism", {"environment": env, "recipes": rows})
    if not all(r["same_model"] and r["same_report"] for r in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
