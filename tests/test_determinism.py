"""Determinism: the same recipe and seed on the same machine give the same bytes, at any thread count
(every example recipe, reduced here; at full length: benchmarks/determinism.py)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from torchslim.quantization.sharing import SharedLinear, kmeans_codebook

SRC = str(Path(__file__).resolve().parents[1] / "src")
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
QUICK_EPOCHS = 0.25  # every training run of every recipe capped at a quarter epoch: the test stays < 60 s
# The pretrained MiniLM recipes load and quantize a 22.7M-parameter model and score 1,500 STS-B pairs: minutes per
# run on 2 cores, twice. Their recipe path is tested on a tiny BERT (tests/test_hf_techniques.py); their
# determinism is not checked by this test.
PRETRAINED = ("minilm",)

# Runs each example recipe, reduced (see reduced()), in this process and prints its model hash and report.
EVERY_RECIPE = """
import hashlib, json, sys, torch, yaml
from pathlib import Path
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[3])
from test_determinism import reduced, _untimed
from torchslim.pipeline.commands import run_recipe
from torchslim.pipeline.recipe import recipe_from_dict
out, result = Path(sys.argv[1]), {}
for path in sorted(Path(sys.argv[2]).glob("*.yaml")):
    if path.stem.startswith(tuple(sys.argv[4].split(","))):
        continue
    recipe = recipe_from_dict(reduced(yaml.safe_load(path.read_text())), str(path), path.parent)
    report = run_recipe(recipe, out / path.stem, log=lambda s: None)
    result[path.stem] = [hashlib.sha256((out / path.stem / "model.slim").read_bytes()).hexdigest(), _untimed(report)]
print(json.dumps(result))
"""


def _capped(node, epochs: float):
    if isinstance(node, dict):
        return {k: min(v, epochs) if k == "epochs" else _capped(v, epochs) for k, v in node.items()}
    if isinstance(node, list):
        return [_capped(v, epochs) for v in node]
    return node


def reduced(recipe: dict) -> dict:
    """An example recipe, reduced for the test suite: every ``epochs`` capped at ``QUICK_EPOCHS``, and the
    Deep Compression recipes on digits at 28x28 instead of MNIST (60,000 images: minutes per run, and the
    files under ../shared/datasets that CI may lack). Everything else (stages, schedules, coding) is kept."""
    recipe = _capped(recipe, QUICK_EPOCHS)
    data = recipe.get("data") or {}
    if "mnist" in (data.get("builtin"), data.get("name")):
        recipe["data"] = {"builtin": "digits", "kwargs": {"image_size": 28}}
    return recipe

# Prune -> weight sharing -> fine-tune, the pipeline whose codebooks and biases used to differ in low bits.
JOINT = """\
name: joint
seed: 0
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 2, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 0.5, check: false}
  - {name: share, type: WeightSharing, bits: 4, check: false}
  - {name: finetune, type: Finetune, train: {epochs: 1, lr: 1.0e-3, progress: false}}
"""


def _untimed(node):
    if isinstance(node, dict):
        return {k: _untimed(v) for k, v in node.items() if "latency" not in k and k != "seconds"}
    if isinstance(node, list):
        return [_untimed(v) for v in node]
    return node


def test_a_recipe_run_twice_with_two_threads_gives_identical_bytes_and_metrics(tmp_path):
    recipe = tmp_path / "joint.yaml"
    recipe.write_text(JOINT)
    script = textwrap.dedent("""
        import sys, torch
        torch.set_num_threads(2)
        from torchslim.pipeline.commands import run_recipe
        run_recipe(sys.argv[1], sys.argv[2], log=lambda s: None)
    """)
    # The baseline cache off: both runs train their baseline.
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="2", TQDM_DISABLE="1", TORCHSLIM_CACHE_DIR="off")
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, "-c", script, str(recipe), str(out)], env=env, check=True)
        runs.append((hashlib.sha256((out / "model.slim").read_bytes()).hexdigest(),
                     _untimed(json.loads((out / "report.json").read_text()))))
    assert runs[0] == runs[1]


def test_every_example_recipe_run_twice_gives_identical_bytes_and_metrics(tmp_path):
    names = sorted(p.stem for p in RECIPES.glob("*.yaml") if not p.stem.startswith(PRETRAINED))
    assert len(names) >= 11
    # The baseline cache off: both runs train their baseline.
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", TQDM_DISABLE="1", TORCHSLIM_CACHE_DIR="off")
    runs = []
    for i in range(2):
        done = subprocess.run([sys.executable, "-c", EVERY_RECIPE, str(tmp_path / str(i)), str(RECIPES),
                               str(Path(__file__).parent), ",".join(PRETRAINED)], env=env, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert sorted(runs[0]) == names
    for name in names:
        assert runs[0][name][0] == runs[1][name][0], f"{name}: model.slim differs between two runs"
        assert runs[0][name][1] == runs[1][name][1], f"{name}: report differs between two runs"


def test_codebook_gradient_is_the_same_at_any_thread_count():
    torch.manual_seed(0)
    layer = SharedLinear(600, 400, num_centroids=32)
    codebook, codes = kmeans_codebook(torch.randn(400, 600), 5)
    layer.set_sharing(codebook, codes)
    x = torch.randn(64, 600)
    threads = torch.get_num_threads()
    grads = []
    try:
        for n in (1, 2, 2, 4):
            torch.set_num_threads(n)
            layer.zero_grad()
            layer(x).square().sum().backward()
            grads.append(layer.codebook.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_kmeans_codebook_is_the_same_at_any_thread_count():
    from threadpoolctl import threadpool_limits

    w = torch.randn(300, 400)
    with threadpool_limits(limits=1):
        ref = kmeans_codebook(w, 5)
    with threadpool_limits(limits=4):
        again = kmeans_codebook(w, 5)
    assert torch.equal(ref[0], again[0]) and torch.equal(ref[1], again[1])
