"""The main job end to end (quick settings): train, search under a one-point budget, report."""

import json

import pytest

import torchslim
from torchslim.cli import main
from torchslim.data import digits
from torchslim.cli.demo import demo_recipe_text
from torchslim.pipeline.recipe import parse_recipe

KEYS = {"accuracy", "params", "nonzero_params", "table_params", "macs", "latency_ms", "size_bytes"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--out", str(out), "--quick"])
    report = json.loads((out / "report.json").read_text())
    assert rc == (0 if report["budget"]["met"] else 3)  # a missed budget is never a silent success
    return out


def test_report_has_the_promised_shape(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    assert set(report) >= {"torchslim_version", "model", "dataset", "device", "baseline", "compressed", "ratios",
                           "accuracy_drop", "stages", "checkpoint", "budget", "search"}
    assert set(report["baseline"]) == KEYS and set(report["compressed"]) == KEYS
    assert set(report["ratios"]) == {"size", "nonzero_params", "macs", "latency"}
    assert [s["name"] for s in report["stages"]] == ["prune", "quantize", "finetune"]
    for s in report["stages"]:
        assert torchslim.config_from_dict(s["config"]).to_dict() == s["config"]
    b, c = report["baseline"], report["compressed"]
    assert report["accuracy_drop"] == pytest.approx(b["accuracy"] - c["accuracy"])
    assert report["ratios"]["size"] == pytest.approx(b["size_bytes"] / c["size_bytes"])
    assert report["ratios"]["latency"] == pytest.approx(b["latency_ms"] / c["latency_ms"])
    # Even the quick demo must compress for real: far fewer non-zeros and a much smaller file.
    assert report["ratios"]["nonzero_params"] > 4 and report["ratios"]["size"] > 10
    assert c["size_bytes"] == (demo_out / report["checkpoint"]).stat().st_size
    search = report["search"]
    assert search["strategy"] == "fast" and report["budget"]["max_accuracy_drop"] == 0.01
    assert (search["chosen"]["certified"] >= search["floor"] - 1e-12) == report["budget"]["feasible_found"]
    md = (demo_out / "report.md").read_text()
    assert "bytes on disk" in md and "accuracy_vs_size.png" in md and "pareto.png" in md
    for name in ("accuracy_vs_size.png", "pareto.png"):
        assert (demo_out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_records_a_recipe_that_reruns(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    assert report["recipe"] == parse_recipe(demo_recipe_text(quick=True), source="demo").to_dict()


def test_checkpoint_reloads_to_the_reported_accuracy(demo_out):
    report = json.loads((demo_out / "report.json").read_text())
    model = torchslim.load(demo_out / report["checkpoint"])
    test = digits(seed=0, val_fraction=0.25).test
    assert torchslim.evaluate(model, test) == pytest.approx(report["compressed"]["accuracy"])
    manifest = torchslim.read_manifest(demo_out / report["checkpoint"])
    assert [h["type"] for h in manifest["history"]] == ["UnstructuredPruning", "WeightSharing", "Finetune"]
    chosen = report["search"]["chosen"]["params"]
    assert chosen["quantize.bits[fc1]"] == 0 or model.fc1.bits == chosen["quantize.bits[fc1]"]


def test_demo_refuses_to_overwrite(demo_out, capsys):
    before = (demo_out / "model.slim").read_bytes()
    assert main(["demo", "--out", str(demo_out), "--quick"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (demo_out / "model.slim").read_bytes() == before
