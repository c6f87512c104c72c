"""Resume and reuse: baseline training and the sensitivity scans resume after a kill; compress, sensitivity and
search share one cached baseline per recipe model/data and seed, loaded through the checkpoint trust rule."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from torchslim.core.errors import CheckpointError
from torchslim.data import digits
from torchslim.export.checkpoint import save
from torchslim.pipeline.baseline import baseline_key, baseline_model
from torchslim.pipeline.commands import run_recipe
from torchslim.pipeline.recipe import load_recipe
from torchslim.search.api import search
from torchslim.search.options import SearchOptions
from torchslim.metrics import evaluate
from torchslim.search import scan
from torchslim.search.problem import Problem
from torchslim.search.scan import sensitivity

from test_recipe import cli, tiny

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")

SRC = str(Path(__file__).resolve().parents[1] / "src")

# Long enough (40 per-epoch checkpoints, about a second on a quiet machine; 8 finished before the kill there)
# that a kill lands in the middle of the training.
LONG = """\
name: long
seed: 3
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 40, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 0.5}
"""

BUILD = """
import sys
from torchslim.pipeline.baseline import baseline_model
from torchslim.pipeline.recipe import build_data, load_recipe
recipe = load_recipe(sys.argv[1])
baseline_model(recipe, build_data(recipe), log=lambda s: print(s, flush=True))
"""


def _env(cache: Path) -> dict:
    return dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", TQDM_DISABLE="1", TORCHSLIM_CACHE_DIR=str(cache))


def _entry(cache: Path, recipe: Path) -> Path:
    return cache / f"baseline-{baseline_key(load_recipe(recipe))[0]}"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_baseline_training_killed_mid_way_resumes_and_gives_the_same_model(tmp_path):
    recipe = tmp_path / "long.yaml"
    recipe.write_text(LONG)
    killed, fresh = tmp_path / "killed", tmp_path / "fresh"
    state = _entry(killed, recipe) / "train-state.pt"
    proc = subprocess.Popen([sys.executable, "-c", BUILD, str(recipe)], env=_env(killed), stdout=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not state.is_file():  # at least one epoch checkpointed
        assert proc.poll() is None and time.monotonic() < deadline, "the training ended before it could be killed"
        time.sleep(0.02)
    time.sleep(random.Random(0).uniform(0.0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (_entry(killed, recipe) / "key.json").exists(), "the kill came after the training had finished"
    step = torch.load(state, weights_only=True)["step"]
    assert step > 0

    again = subprocess.run([sys.executable, "-c", BUILD, str(recipe)], env=_env(killed), capture_output=True,
                           text=True, check=True).stdout
    assert f"resuming the baseline training from {state}" in again and not state.exists()
    subprocess.run([sys.executable, "-c", BUILD, str(recipe)], env=_env(fresh), capture_output=True, check=True)
    # Resumed from epoch step / batches, the model is byte for byte the uninterrupted one.
    assert _sha(_entry(killed, recipe) / "model.slim") == _sha(_entry(fresh, recipe) / "model.slim")


def test_a_stale_or_foreign_training_state_is_not_resumed(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe(tiny(tmp_path))
    data = digits(image_size=8, val_fraction=0.25)
    entry = tmp_path / "cache" / f"baseline-{baseline_key(recipe)[0]}"
    entry.mkdir(parents=True)
    torch.save({"step": 3, "total": 999, "batches": 1, "loader_rng": []}, entry / "train-state.pt")
    with pytest.warns(UserWarning, match="training from scratch: cannot resume"):
        model, reused = baseline_model(recipe, data, log=lambda s: None)
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", "off")
    plain, _ = baseline_model(recipe, data, log=lambda s: None)
    assert reused is None and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                    plain.state_dict().values()))


def test_the_cache_key_changes_with_the_model_data_seed_and_factory_files(tmp_path):
    base = load_recipe(tiny(tmp_path))
    key = baseline_key(base)[0]
    assert baseline_key(base.replace(stages=base.stages[:1]))[0] == key  # stages do not change the baseline
    assert baseline_key(base.replace(seed=1))[0] != key
    spec = base.model
    longer = spec.__class__(**{**spec.__dict__, "train": spec.train.replace(epochs=7)})
    assert baseline_key(base.replace(model=longer))[0] != key
    (tmp_path / "mymodel.py").write_text("def build():\n    pass\n")
    factory = spec.__class__(**{**spec.__dict__, "builtin": None, "kwargs": {}, "factory": "mymodel:build"})
    with_factory = base.replace(model=factory, base_dir=str(tmp_path))
    k1 = baseline_key(with_factory)[0]
    (tmp_path / "mymodel.py").write_text("def build():\n    return 1\n")
    assert baseline_key(with_factory)[0] != k1


def test_compress_sensitivity_and_search_reuse_one_cached_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path / "cache"))
    recipe = tiny(tmp_path)
    entry = _entry(tmp_path / "cache", recipe)
    first: list[str] = []
    r1 = run_recipe(recipe, tmp_path / "c1", log=first.append)
    assert r1["baseline_reused_from"] is None and any(s.startswith("training the") for s in first)
    assert (entry / "model.slim").is_file() and not (entry / "train-state.pt").exists()

    second: list[str] = []
    r2 = run_recipe(recipe, tmp_path / "c2", log=second.append)
    note = f"reused cached baseline from {entry / 'model.slim'}"
    assert note in second and not any(s.startswith("training the") for s in second)
    assert r2["baseline_reused_from"] == str(entry / "model.slim")
    assert "Reused cached baseline from" in (tmp_path / "c2" / "report.md").read_text()
    # The same baseline, hence the same result (timings aside).
    assert (tmp_path / "c1" / "model.slim").read_bytes() == (tmp_path / "c2" / "model.slim").read_bytes()
    assert r1["baseline"]["accuracy"] == r2["baseline"]["accuracy"]

    assert cli(["sensitivity", str(recipe), "--out", str(tmp_path / "s"), "--sparsities", "0.5",
                "--bits", "4", "--layers", "fc1"]) == 0
    assert note in capsys.readouterr().out
    assert not (tmp_path / "s" / ".sensitivity-progress.jsonl").exists()

    lines: list[str] = []
    res = search(recipe, tmp_path / "q", SearchOptions(progress=False, max_accuracy_drop=0.05), log=lines.append)
    assert note in lines and res.report["baseline_reused_from"] == str(entry / "model.slim")


class Foreign(nn.Module):
    """Neither torchslim's nor named by the recipe: a checkpoint that builds it is refused."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_a_tampered_cache_entry_is_refused_by_the_trust_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(tmp_path / "cache"))
    recipe = load_recipe(tiny(tmp_path))
    data = digits(image_size=8, val_fraction=0.25)
    baseline_model(recipe, data, log=lambda s: None)
    entry = tmp_path / "cache" / f"baseline-{baseline_key(recipe)[0]}"
    save(Foreign(), entry / "model.slim", overwrite=True, factory=f"{__name__}:Foreign")
    with pytest.raises(CheckpointError, match="Foreign"):
        baseline_model(recipe, data, log=lambda s: None)


def test_sensitivity_scan_resumes_from_its_finished_points(tmp_path, trained_lenet5, digits_data, monkeypatch):
    progress = tmp_path / "p.jsonl"
    kw = dict(sparsities=(0.5, 0.9), bits=(4,), layers=["fc*"], progress=False)
    full = sensitivity(trained_lenet5, digits_data.val, **kw)
    sensitivity(trained_lenet5, digits_data.val, resume=progress, **kw)
    lines = progress.read_text().splitlines()
    assert json.loads(lines[0]).keys() == {"key"} and len(lines) == 1 + len(full.rows)
    # Killed after two points, the third torn mid-write: the re-run keeps two and computes the rest.
    progress.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])
    computed = []
    real = scan._magnitude
    monkeypatch.setattr(scan, "_magnitude", lambda w, s: computed.append(s) or real(w, s))
    resumed = sensitivity(trained_lenet5, digits_data.val, resume=progress, **kw)
    n_sparsity = sum(r["kind"] == "sparsity" for r in full.rows)
    assert resumed.rows == full.rows and len(computed) == n_sparsity - 2
    assert len(progress.read_text().splitlines()) == 1 + len(full.rows)
    # Other settings (or another model) start afresh.
    computed.clear()
    other = sensitivity(trained_lenet5, digits_data.val, resume=progress, **{**kw, "bits": (3,)})
    assert len(computed) == n_sparsity and {r["value"] for r in other.rows if r["kind"] == "bits"} == {3}


def test_knob_scan_of_the_search_resumes_from_stored_points(tmp_path, monkeypatch):
    recipe = load_recipe(tiny(tmp_path))
    data = digits(image_size=8, val_fraction=0.25)
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", "off")
    model, _ = baseline_model(recipe, data, log=lambda s: None)
    problem = Problem(recipe, model, data, objective="size", metric_fn=evaluate)
    example = data.example_inputs(1)
    snapshots = []

    def scan_once(**kw):
        return scan.knob_sensitivity(model, problem.stages, problem.knobs, data, example, metric_fn=evaluate,
                                     objective_fn=problem.objective_value, progress=False, **kw)

    full = scan_once(on_point=lambda r: snapshots.append(json.loads(json.dumps(r))))
    n_points = sum(len(v) for v in full["knobs"].values())
    assert len(snapshots) == n_points > 2
    applied = []
    real = scan.apply_stage
    monkeypatch.setattr(scan, "apply_stage", lambda *a: applied.append(1) or real(*a))
    resumed = scan_once(resume=snapshots[1])  # what the study held when the scan was killed after 2 points
    assert resumed == json.loads(json.dumps(full)) and len(applied) == n_points - 2


def test_an_unwritable_cache_folder_costs_the_reuse_not_the_run(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("TORCHSLIM_CACHE_DIR", str(blocker / "cache"))
    lines: list[str] = []
    model, reused = baseline_model(load_recipe(tiny(tmp_path)), digits(image_size=8, val_fraction=0.25),
                                   log=lines.append)
    assert reused is None and any(s.startswith("not caching the baseline: cannot write") for s in lines)
    assert any(s.startswith("training the") for s in lines)
