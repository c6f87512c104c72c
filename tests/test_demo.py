"""The main job end to end (quick settings) and its report."""

import json

import pytest
import torch

import torchslim
from torchslim.cli import main
from torchslim.data import digits

KEYS = {"accuracy", "params", "nonzero_params", "macs", "latency_ms", "size_bytes"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    return out


def test_report_has_the_promised_shape(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    assert set(report) >= {"torchslim_version", "model", "dataset", "device", "baseline", "compressed", "ratios",
                           "accuracy_drop", "stages", "checkpoint"}
    assert set(report["baseline"]) == KEYS and set(report["compressed"]) == KEYS
    assert set(report["ratios"]) == {"size", "nonzero_params", "macs", "latency"}
    assert [s["name"] for s in report["stages"]] == ["structured", "unstructured"]
    for s in report["stages"]:
        assert set(s) == {"name", "config", "accuracy", "size_bytes", "seconds"}
        assert torchslim.config_from_dict(s["config"]).to_dict() == s["config"]
    b, c = report["baseline"], report["compressed"]
    assert report["accuracy_drop"] == pytest.approx(b["accuracy"] - c["accuracy"])
    assert report["ratios"]["size"] == pytest.approx(b["size_bytes"] / c["size_bytes"])
    # Even the quick demo must compress for real: fewer MACs, far fewer non-zeros, a much smaller file.
    assert c["macs"] < b["macs"] / 2
    assert report["ratios"]["nonzero_params"] > 8 and report["ratios"]["size"] > 4
    assert c["accuracy"] > 0.85
    assert c["size_bytes"] == (demo_out / report["checkpoint"]).stat().st_size
    md = (demo_out / "report.md").read_text()
    assert "bytes on disk" in md and "accuracy_vs_size.png" in md
    assert (demo_out / "accuracy_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_reloads_to_the_reported_accuracy(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    model = torchslim.load(demo_out / report["checkpoint"])
    assert torchslim.evaluate(model, digits(seed=0).test) == pytest.approx(report["compressed"]["accuracy"])
    manifest = torchslim.read_manifest(demo_out / report["checkpoint"])
    assert [h["type"] for h in manifest["history"]] == ["StructuredPruning", "UnstructuredPruning"]
    assert model.conv1.out_channels == 10  # structured pruning survived the round trip
    assert hasattr(model.fc1, "weight_mask")  # masks come back, so further fine-tuning keeps zeros


def test_demo_refuses_to_overwrite(demo_out, capsys):
    before = (demo_out / "model.slim").read_bytes()
    assert main(["demo", "--out", str(demo_out), "--quick"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (demo_out / "model.slim").read_bytes() == before
