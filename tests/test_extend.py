"""Extension points of structured pruning: user importance criteria and op rules for the channel tracer."""

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchslim import ConfigError, StructuredPruning, UnsupportedModelError
from torchslim.metrics import count_macs
from torchslim.pruning import Importance, register_importance, register_op_rule
from torchslim.pruning.oprules import submodule
from torchslim.pruning.structured import masked_like, structured_prune

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def example():
    """The README's example, run once per process (it registers a criterion and an op rule)."""
    text = README.read_text()
    section = text[text.index("### Adding an importance criterion or an op rule"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"__name__": "readme_example"}
    with pytest.warns(UserWarning, match="channels of '0' unpruned.*not produced by a traced layer"):
        exec(compile(code, str(README), "exec"), namespace)
    return namespace


def _prune(model, x, importance="l1"):
    pruned = copy.deepcopy(model)
    summary = structured_prune(pruned, StructuredPruning(ratio=0.5, importance=importance), (x,))
    return pruned, summary


def test_op_rule_lets_a_custom_layer_be_pruned(example):
    model, x, before, after = example["model"], example["x"], example["before"], example["after"]
    assert before[0].out_channels == 16 and after[0].out_channels == 8  # left whole before the rule
    assert after[2].gain.shape == (8,) and after[3].in_channels == 8
    assert count_macs(after, (x,)) < count_macs(before, (x,)) < count_macs(model, (x,))
    pruned, summary = _prune(model, x, "max_abs")
    assert summary["removed_channels"]["0"] == [16, 8]
    assert any(m["module"] == "2" and m["param"] == "gain" for m in summary["members"]["0"])
    with torch.no_grad():
        out, ref = pruned.eval()(x), masked_like(model, summary).eval()(x)
    assert (out - ref).abs().max().item() < 1e-5


def test_registered_importance_changes_which_channels_go(example):
    model, x = example["model"], example["x"]
    _, by_l1 = _prune(model, x, "l1")
    _, by_max = _prune(model, x, "max_abs")
    top = model[0].weight.detach().abs().flatten(1).amax(1).argsort(descending=True)[:8]
    assert by_max["kept"]["0"] == sorted(top.tolist())
    assert by_l1["kept"]["0"] != by_max["kept"]["0"]


def test_importance_object_and_unknown_names(example):
    class LastFirst(Importance):
        """Prefers later channels: keeps the upper half of every group."""

        def score(self, model, group):
            return torch.arange(1, group.size + 1, dtype=torch.float)

    register_importance("test_last_first", LastFirst())
    _, summary = _prune(example["model"], example["x"], "test_last_first")
    assert summary["kept"]["0"] == list(range(8, 16)) and summary["kept"]["3"] == list(range(8, 16))
    with pytest.raises(ConfigError, match=r"'l1', 'l2', 'taylor', 'bn_scale'.*'max_abs'.*got 'nope'"):
        StructuredPruning(importance="nope")
    register_importance("test_wrong_size", lambda model, group: torch.ones(group.size + 1))
    with pytest.raises(ConfigError, match="'test_wrong_size' returned .*one per channel"):
        _prune(example["model"], example["x"], "test_wrong_size")


def test_duplicates_are_rejected(example):
    with pytest.raises(ConfigError, match="'max_abs' is already registered"):
        register_importance("max_abs", example["max_abs"])
    with pytest.raises(ConfigError, match="'l1' is already registered"):
        register_importance("l1", example["max_abs"])
    with pytest.raises(ConfigError, match="'ChannelGain' is already registered"):
        register_op_rule(example["ChannelGain"], example["per_channel"]("gain"))
    with pytest.raises(ConfigError, match="'Conv2d' is already registered"):
        register_op_rule(nn.Conv2d, example["per_channel"]("weight"))
    with pytest.raises(ConfigError, match="not an nn.Module"):
        register_op_rule(int, example["per_channel"]("gain"))
    with pytest.raises(ConfigError, match="pass an instance"):
        register_importance("test_class", Importance)


class ScaledConv(nn.Module):
    """A conv wrapper computing ``F.conv2d`` itself from its submodule's weight (times a scalar)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.alpha = nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        return F.conv2d(x, self.conv.weight * self.alpha, self.conv.bias, padding=1)


def test_submodule_rule_for_a_conv_wrapper():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledConv(3, 12), nn.BatchNorm2d(12), nn.ReLU(), ScaledConv(12, 6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    # F.conv2d on a weight: the tracer sees no layer, so nothing can be pruned, and the error names the wrapper.
    with pytest.raises(UnsupportedModelError, match=r"0 \(ScaledConv\).*register_op_rule"):
        _prune(model, x)
    register_op_rule(ScaledConv, submodule("conv"))
    pruned, summary = _prune(model, x)
    assert summary["removed_channels"] == {"0.conv": [12, 6], "3.conv": [6, 3]}
    assert pruned[0].conv.out_channels == 6 and pruned[1].num_features == 6 and pruned[3].conv.in_channels == 6
    assert count_macs(pruned, (x,)) < count_macs(model, (x,))
    with torch.no_grad():
        assert (pruned(x) - masked_like(model, summary)(x)).abs().max().item() < 1e-5
