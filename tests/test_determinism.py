"""Determinism: the same recipe and seed on the same machine give the same bytes, at any thread count
(every example recipe: benchmarks/determinism.py)."""

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
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="2", TQDM_DISABLE="1")
    runs = []
    for i in range(2):
        out = tmp_path / str(i)
        subprocess.run([sys.executable, "-c", script, str(recipe), str(out)], env=env, check=True)
        runs.append((hashlib.sha256((out / "model.slim").read_bytes()).hexdigest(),
                     _untimed(json.loads((out / "report.json").read_text()))))
    assert runs[0] == runs[1]


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
