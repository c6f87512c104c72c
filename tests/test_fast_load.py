"""Compressed models in their inference form: masks folded, coded weights decoded, exactly the same outputs."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

import torchslim
from torchslim.models import LeNet5
from torchslim.nn.inference import fold_masks, for_inference, inference_ready
from torchslim.nn.masks import masked_names
from torchslim.quantization.modules import QConv2d, QLinear
from torchslim.quantization.sharing import SharedWeight

DATA = Path(__file__).parent / "data"


def _compressed() -> nn.Module:
    """A LeNet-5 with masked layers (pruned, not shared) and weight-shared layers."""
    torch.manual_seed(0)
    model = torchslim.prune(LeNet5(), torchslim.UnstructuredPruning(sparsity=0.8))
    return torchslim.quantize(model, torchslim.WeightSharing(bits=4, exclude=("fc2", "conv1"))).eval()


def _assert_plain(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not masked_names(module) and not module._forward_pre_hooks and not module._forward_hooks, name
        assert not isinstance(module, (SharedWeight, QLinear, QConv2d)), name
        assert not any(n.endswith(("_orig", "_mask")) for n, _ in module.named_parameters(recurse=False)), name
    assert not any(n.endswith("_mask") for n, _ in model.named_buffers())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_for_inference_folds_masks_decodes_shared_layers_and_keeps_outputs():
    model = _compressed()
    assert masked_names(model.conv1) == ["weight"] and isinstance(model.fc1, SharedWeight)
    assert not inference_ready(model)
    fast = for_inference(model)
    _assert_plain(fast)
    assert inference_ready(fast)
    assert type(fast.fc1) is nn.Linear and type(fast.conv2) is nn.Conv2d
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
    # The original is untouched: still masked and shared, so it can be fine-tuned further.
    assert masked_names(model.conv1) == ["weight"] and isinstance(model.fc1, SharedWeight)
    pruned = model.conv1.weight_mask == 0
    assert pruned.any() and torch.equal(fast.conv1.weight == 0, pruned)  # the zeros are in the weight itself


def test_fold_masks_in_place_counts_masks():
    model = torchslim.prune(LeNet5(), torchslim.UnstructuredPruning(sparsity=0.5))
    n = sum(len(masked_names(m)) for m in model.modules())
    assert n > 0 and fold_masks(model) == n
    assert not any(masked_names(m) for m in model.modules())


def test_integer_code_layers_decode_unless_kept_packed():
    torch.manual_seed(1)
    lin = QLinear(12, 5, bits=2)
    conv = QConv2d(3, 4, 3, padding=1, bits=2, scale_shape=(4, 1, 1, 1))
    for layer in (lin, conv):
        layer.weight_codes.copy_(torch.randint(-1, 2, layer.weight_codes.shape))
        layer.weight_scale.uniform_(0.1, 1.0)
        layer.bias.data.normal_()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(4 * 5 * 5, 12), lin).eval()
    x = torch.randn(2, 3, 5, 5)
    fast = for_inference(model)
    assert type(fast[0]) is nn.Conv2d and type(fast[3]) is nn.Linear
    packed = for_inference(model, keep_packed=True)
    assert isinstance(packed[0], QConv2d) and isinstance(packed[3], QLinear)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x)) and torch.equal(packed(x), model(x))


def test_quantized_inputs_keep_their_layer():
    layer = QLinear(6, 3, bits=8, input_range=(-128, 127)).eval()
    fast = for_inference(nn.Sequential(layer))
    assert isinstance(fast[0], QLinear)  # no float layer quantizes its input: kept, outputs unchanged


def test_load_for_inference(tmp_path):
    model = _compressed()
    path = torchslim.save(model, tmp_path / "m.slim")
    trainable = torchslim.load(path)
    assert masked_names(trainable.conv1) == ["weight"] and isinstance(trainable.fc1, SharedWeight)
    fast = torchslim.load(path, for_inference=True)
    _assert_plain(fast)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))


def test_old_format_file_loads_for_inference():
    expected = safetensors.torch.load_file(DATA / "v1_lenet300.expected.safetensors")
    fast = torchslim.load(DATA / "v1_lenet300.slim", for_inference=True)
    _assert_plain(fast)
    with torch.no_grad():
        assert torch.equal(fast(expected["x"]), expected["y"])


def test_report_latency_is_measured_in_inference_form(monkeypatch):
    from torchslim.pipeline import commands

    seen = {}

    def fake_compare(models, example_inputs, **kwargs):
        seen.update(models)
        return {name: 1.0 for name in models}

    monkeypatch.setattr(commands, "compare_latency", fake_compare)
    b, c = {}, {}
    commands.side_by_side_latency(b, LeNet5().eval(), c, _compressed(), (torch.randn(1, 1, 28, 28),))
    assert b["latency_ms"] == c["latency_ms"] == 1.0
    for model in seen.values():
        _assert_plain(model)



def test_choose_skips_points_over_the_latency_ceiling():
    from torchslim.search.pareto import choose

    points = [{"trial": 0, "metric": 0.9, "objective": 100.0, "latency_ratio": 1.3},
              {"trial": 1, "metric": 0.9, "objective": 200.0, "latency_ratio": 0.98},
              {"trial": 2, "metric": 0.5, "objective": 50.0, "latency_ratio": 0.9}]
    assert choose(points, 0.8)[0]["trial"] == 0
    assert choose(points, 0.8, 1.0) == (points[1], True)
    assert choose(points, 0.8, 0.5)[1] is False


TINY = """\
name: tiny
model: {builtin: lenet300, kwargs: {in_features: 64}, train: {epochs: 6, lr: 3.0e-3, progress: false}}
data: {builtin: digits, kwargs: {image_size: 8, val_fraction: 0.25}}
budget: {max_accuracy_drop: 0.03}
search: {max_latency_ratio: 1.0}
stages:
  - {name: prune, type: UnstructuredPruning, sparsity: 0.9, check: false}
  - {name: finetune, type: Finetune, train: {epochs: 1, lr: 1.0e-3, progress: false}}
"""


def test_latency_ceiling_marks_slow_candidates_infeasible(tmp_path, monkeypatch):
    """A fake latency (no timing): candidates keeping under 15% of the weights are 'twice as slow'."""
    import json

    from torchslim.pipeline.recipe import load_recipe
    from torchslim.search import problem
    from torchslim.search.api import search
    from torchslim.search.options import SearchOptions

    def density(model):
        weights = [m.weight for m in for_inference(model).modules() if isinstance(m, nn.Linear)]
        return sum(int(w.count_nonzero()) for w in weights) / sum(w.numel() for w in weights)

    calls = []

    def fake_ratio(baseline, model, example_inputs):
        calls.append(density(model))
        return 2.0 if calls[-1] < 0.15 else 1.0

    monkeypatch.setattr(problem, "latency_ratio", fake_ratio)
    (tmp_path / "tiny.yaml").write_text(TINY)
    assert load_recipe(tmp_path / "tiny.yaml").search.max_latency_ratio == 1.0
    r = search(tmp_path / "tiny.yaml", tmp_path / "out", SearchOptions(progress=False), log=lambda s: None)
    slow = [p for p in r.points if p["latency_ratio"] == 2.0]
    assert slow and len(calls) >= len(r.points)  # every evaluation was measured
    assert r.feasible and r.chosen["latency_ratio"] == 1.0
    # Without the ceiling the smallest file would have been one of the slow ones.
    assert min(p["objective"] for p in slow) < r.chosen["objective"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["search"]["max_latency_ratio"] == 1.0
