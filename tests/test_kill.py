"""Kill safety: a process killed (SIGKILL) while saving or compressing leaves no partial output, and the next run
into the same folder removes its temporary files."""

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

from torchslim.core import files
from torchslim.export.checkpoint import save
from torchslim.pipeline.commands import run_recipe

from test_recipe import tiny

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and pid checks are POSIX")

SRC = str(Path(__file__).resolve().parents[1] / "src")

SAVE_LOOP = """
import sys, torch
from torch import nn
from torchslim.export.checkpoint import save
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
print("ready", flush=True)
while True:
    save(model, sys.argv[1], overwrite=True)
"""

COMPRESS_LOOP = """
import sys
from torchslim.pipeline.commands import run_recipe
print("ready", flush=True)
while True:
    run_recipe(sys.argv[1], sys.argv[2], overwrite=True, log=lambda s: None)
"""


def _kill_during(script: str, args: list[str], delay: float) -> None:
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _leftovers(folder: Path) -> list[Path]:
    # A process killed before it created the folder left nothing behind.
    return [p for p in folder.iterdir() if p.name.startswith(".")] if folder.is_dir() else []


def _age(paths: list[Path]) -> None:
    # Leftovers younger than STALE_AFTER_S are spared; make them look old rather than wait.
    old = time.time() - 2 * files.STALE_AFTER_S
    for p in paths:
        os.utime(p, (old, old))


def test_killed_save_leaves_whole_files_and_the_next_save_cleans_up(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    ref = tmp_path / "ref" / "model.slim"
    save(model, ref)
    out = tmp_path / "out" / "model.slim"
    rng = random.Random(0)
    for _ in range(3):
        _kill_during(SAVE_LOOP, [str(out)], rng.uniform(0.0, 0.3))
        if out.exists():  # the old or the new file, never a part of one
            assert out.read_bytes() == ref.read_bytes()
        _age(_leftovers(out.parent))
    save(model, out, overwrite=True)
    assert _leftovers(out.parent) == [] and out.read_bytes() == ref.read_bytes()


def test_stale_leftovers_of_live_or_foreign_processes_are_kept(tmp_path):
    mine = tmp_path / f".model.slim.{files.owner_tag()}.0123456789ab.tmp"
    foreign = tmp_path / ".model.slim.zzzzzz-1.0123456789ab.tmp"
    host = "000000" if files._host_tag() != "000000" else "111111"
    other_host = tmp_path / f".model.slim.{host}-999999999.0123456789ab.tmp"
    for p in (mine, foreign, other_host):
        p.write_bytes(b"x")
    _age([mine, foreign, other_host])
    assert files.remove_stale(tmp_path) == []
    dead = tmp_path / f".publish-{files._host_tag()}-999999999-abc_12"
    dead.mkdir()
    (dead / "model.slim").write_bytes(b"x")
    fresh = tmp_path / f".model.slim.{files._host_tag()}-999999999.0123456789ab.tmp"
    fresh.write_bytes(b"x")
    _age([dead])
    assert files.remove_stale(tmp_path) == [dead]  # the fresh one may still be written by a pid reused elsewhere
    assert fresh.exists()


def test_killed_compress_leaves_no_partial_outputs_and_the_next_run_cleans_up(tmp_path):
    recipe = tiny(tmp_path)
    out = tmp_path / "out"
    rng = random.Random(1)
    for _ in range(2):
        _kill_during(COMPRESS_LOOP, [str(recipe), str(out)], rng.uniform(0.5, 4.0))
        if (out / "report.json").exists():  # a report always comes with the model it describes
            report = json.loads((out / "report.json").read_text())
            assert (out / "model.slim").stat().st_size == report["compressed"]["size_bytes"]
        _age(_leftovers(out) + [p for d in _leftovers(out) if d.is_dir() for p in d.iterdir()])
    run_recipe(recipe, out, overwrite=True, log=lambda s: None)
    assert _leftovers(out) == []
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.slim").stat().st_size == report["compressed"]["size_bytes"]
