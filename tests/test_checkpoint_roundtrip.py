"""save -> load rebuilds every module in its original order and structure, and gives identical outputs."""

import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from torchslim.core.errors import TorchslimError
from torchslim.export.checkpoint import load, register_module, save

try:  # the property test needs hypothesis (the "test" extra); the fixed cases below do not
    import hypothesis
    from hypothesis import strategies as st
except ImportError:
    hypothesis = None

C, W = 3, 4  # every generated layer maps (N, C, W, W) to the same shape


class ListBlock(nn.Module):
    """Runs a ModuleList in order."""

    def __init__(self):
        super().__init__()
        self.items = nn.ModuleList()

    def forward(self, x):
        for m in self.items:
            x = m(x)
        return x


class DictBlock(nn.Module):
    """Runs a ModuleDict's values in insertion order."""

    def __init__(self):
        super().__init__()
        self.items = nn.ModuleDict()

    def forward(self, x):
        for m in self.items.values():
            x = m(x)
        return x


register_module(ListBlock, lambda m: {}, lambda a: ListBlock(), replace=True)
register_module(DictBlock, lambda m: {}, lambda a: DictBlock(), replace=True)

_LEAVES = ("linear", "relu", "conv1", "conv3")


def _leaf(kind: str, prune_it: bool) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    m = nn.Linear(W, W) if kind == "linear" else nn.Conv2d(C, C, int(kind[-1]), padding=int(kind[-1]) // 2)
    if prune_it:
        prune.l1_unstructured(m, "weight", amount=0.5)
    return m


def _build(spec) -> nn.Module:
    kind, body = spec
    if kind in _LEAVES:
        return _leaf(kind, body)
    if kind == "seq":
        return nn.Sequential(*(_build(s) for s in body))
    block = ListBlock() if kind == "list" else DictBlock()
    for s in body if kind == "list" else body.items():
        if kind == "list":
            block.items.append(_build(s))
        else:
            block.items[s[0]] = _build(s[1])
    return block


def _structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in model.named_modules()]


def _round_trip(model: nn.Module, x: torch.Tensor) -> nn.Module:
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load(save(model, Path(tmp) / "m.slim", example_inputs=x)).eval()
    assert _structure(loaded) == _structure(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    return loaded


if hypothesis is not None:
    _names = st.text("abcxyz0123456789", min_size=1, max_size=3).map(lambda s: "k" + s)
    _tree = st.recursive(
        st.tuples(st.sampled_from(_LEAVES), st.booleans()),
        lambda inner: st.one_of(
            st.tuples(st.just("seq"), st.lists(inner, min_size=0, max_size=13)),
            st.tuples(st.just("list"), st.lists(inner, min_size=0, max_size=12)),
            st.tuples(st.just("dict"), st.dictionaries(_names, inner, min_size=0, max_size=5)),
        ),
        max_leaves=30,
    )

    @hypothesis.settings(max_examples=30, deadline=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
    @hypothesis.given(tree=st.lists(_tree, min_size=1, max_size=14), seed=st.integers(0, 2**16))
    def test_generated_architectures_load_back_identical(tree, seed):
        torch.manual_seed(seed)
        model = nn.Sequential(*(_build(s) for s in tree))
        _round_trip(model, torch.randn(2, C, W, W))
else:
    @pytest.mark.skip(reason="needs hypothesis (pip install torchslim[test])")
    def test_generated_architectures_load_back_identical():
        pass


def test_twelve_layer_sequential_keeps_its_order(tmp_path):
    torch.manual_seed(0)
    dims = [5, 6, 7, 8, 9, 10, 11]
    layers = []
    for a, b in zip(dims, dims[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers)
    assert len(model) == 12
    loaded = _round_trip(model, torch.randn(3, 5))
    assert [type(m) for m in loaded] == [type(m) for m in model]
    assert [m.in_features for m in loaded if isinstance(m, nn.Linear)] == dims[:-1]


def test_named_children_keep_their_insertion_order():
    from collections import OrderedDict

    model = nn.Sequential(OrderedDict([("z", nn.Linear(4, 6)), ("b", nn.ReLU()), ("a", nn.Linear(6, 2))]))
    loaded = _round_trip(model, torch.randn(2, 4))
    assert [n for n, _ in loaded.named_children()] == ["z", "b", "a"]


class _Drifting(nn.Linear):
    """A module whose forward depends on an attribute the checkpoint cannot know about."""

    def __init__(self):
        super().__init__(4, 4)
        self.scale = 1.0

    def forward(self, x):
        return super().forward(x) * self.scale


def test_save_compares_outputs_on_example_inputs(tmp_path):
    model = _Drifting()
    model.scale = 3.0
    save(model, tmp_path / "ok.slim")  # names and shapes alone match
    with pytest.raises(TorchslimError, match="different outputs on example_inputs"):
        save(model, tmp_path / "m.slim", example_inputs=torch.randn(2, 4))
    assert not (tmp_path / "m.slim").exists()
