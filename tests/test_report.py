"""What a person reads: the command line's help, the report's numbers and the plots."""

from __future__ import annotations

import argparse

import pytest

from torchslim.cli import build_parser


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(_subcommands()))
def test_every_command_help_has_option_texts_defaults_examples_and_exit_codes(name):
    p = _subcommands()[name]
    for action in p._actions:
        assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
    text = p.format_help()
    assert text.count(f"torchslim {name}") >= 3  # usage line and two examples
    assert "exit codes: 0 done; 2 bad input" in text and "3 the result misses" in text
    for action in p._actions:
        if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
            assert str(action.default) in text, f"{name} --help does not show the default of {action.dest}"
        if action.choices and action.dest != "command":
            assert "{" + ",".join(action.choices) + "}" in text


RECIPE = """\
name: tiny-report
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 6, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
budget: {max_accuracy_drop: 0.05}
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 0.8, check: false}
  - {name: share, type: WeightSharing, bits: 5, check: false}
  - {name: finetune, type: Finetune, train: {epochs: 1, lr: 1.0e-3, progress: false}}
"""


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    from torchslim.pipeline.commands import run_recipe

    tmp = tmp_path_factory.mktemp("report")
    (tmp / "r.yaml").write_text(RECIPE)
    report = run_recipe(tmp / "r.yaml", tmp / "out", log=lambda s: None)
    return report, tmp / "out"


def test_one_bytes_figure_named_splits_and_per_field_config_tables(compressed):
    report, out = compressed
    size = (out / "model.slim").stat().st_size
    assert report["compressed"]["size_bytes"] == size == report["stages"][-1]["size_bytes"]
    md = (out / "report.md").read_text()
    assert md.startswith("# torchslim report: tiny-report: lenet300 on digits")
    assert f"| bytes on disk (saved file) | {report['baseline']['size_bytes']:,} | {size:,} |" in md
    assert f"| finetune | {report['stages'][-1]['val_accuracy']:.4f} | {report['stages'][-1]['accuracy']:.4f} | " \
           f"{size:,} |" in md
    assert "| accuracy (test split) |" in md and "val accuracy (decisions)" in md and "test accuracy" in md
    bits = report["stages"][1]["config"]["bits"]
    assert "### Stage `share`: WeightSharing" in md and f"| bits | {bits} |" in md and "| train.lr | 0.001 |" in md
    assert '{"type"' not in md  # no one-line JSON configs
    b = report["budget"]
    assert 300 < b["val_samples"] < 400 and 0 < b["drop_val_bound"] and f"rests on {b['val_samples']} samples" in md


def test_latency_is_recorded_with_its_spread_and_load_and_the_note_names_the_cause(compressed):
    from torchslim.pipeline.report import latency_causes, render_markdown

    report, _ = compressed
    noise = report["latency_noise"]
    assert set(noise) == {"spread", "load_average", "cpus", "noisy"}
    assert set(noise["spread"]) == {"baseline", "compressed"} and all(v >= 0 for v in noise["spread"].values())
    causes = latency_causes(report["stages"])
    assert any("unstructured zeros" in c for c in causes) and any("shared" in c for c in causes)
    qat = {"name": "q", "config": {"type": "QAT", "bits": 4}, "guard": "ok"}
    assert latency_causes([qat]) == ["4-bit QAT layers, which run as float fake-quantized layers (no fast 4-bit "
                                     "kernel)"]
    slow = {**report, "ratios": {**report["ratios"], "latency": 0.5}, "stages": [qat] * 0 + report["stages"],
            "latency_noise": {**noise, "noisy": True, "load_average": 9.0, "cpus": 2}}
    md = render_markdown(slow, None)
    assert "unstructured zeros" in md and "**Noisy latency measurement:**" in md and "load average was 9.0" in md
