"""Structured pruning beyond plain convs: grouped convs (also after a concatenation), LSTM/GRU hidden units,
Conv1d/Conv3d, transposed convs, GroupNorm, channels-last, and what stays unpruned is named."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim
from torchslim.metrics.profile import count_macs
from torchslim.models.zoo import GroupedCatNet, ResNet18, RNNClassifier
from torchslim.pruning import StructuredPruning, masked_like, structured_prune


def _prune(model: nn.Module, x: torch.Tensor, ratio=0.5) -> tuple[nn.Module, dict, list[str]]:
    pruned = copy.deepcopy(model).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = structured_prune(pruned, StructuredPruning(ratio=ratio), (x,))
    return pruned, summary, [str(w.message) for w in caught]


def _masked_diff(model: nn.Module, pruned: nn.Module, summary: dict, x: torch.Tensor) -> float:
    with torch.no_grad():
        return (pruned(x) - masked_like(model, summary).eval()(x)).abs().max().item()


def _randomise_norms(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
            if getattr(m, "running_var", None) is not None:
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model.eval()


def test_grouped_conv_after_concat_prunes_group_consistently():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    model = _randomise_norms(GroupedCatNet(width=8, groups=4))
    pruned, summary, _ = _prune(model, x)
    grouped = [(n, m) for n, m in pruned.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(grouped) == 2
    for name, conv in grouped:
        before = model.get_submodule(name)
        assert conv.groups == 4 and conv.in_channels * 2 == before.in_channels
        assert conv.out_channels * 2 == before.out_channels
    assert pruned.left[0].out_channels == pruned.right[0].out_channels == 4
    # Both branches lose the same positions of every group: the kept input channels of group g are the
    # kept positions shifted by g * 4, whichever branch they come from.
    kept = summary["kept"]["left.0"]
    removed = [k for k in range(4) if k not in kept]
    masked = masked_like(model, summary)
    for branch in (masked.left[0], masked.right[0]):
        zero_rows = [i for i in range(8) if not branch.weight[i].any()]
        assert zero_rows == sorted(r + 4 * g for g in range(2) for r in removed)
    assert _masked_diff(model, pruned, summary, x) < 1e-5
    assert count_macs(model, (x,)) / count_macs(pruned, (x,)) >= 2.5


class MisalignedCat(nn.Module):
    """A concatenation of 6 + 10 channels read by a conv with groups=4 (4 channels per group): group 1 spans
    both parts."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(3, 10, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.g(F.relu(torch.cat([self.a(x), self.b(x)], 1)))
        return self.fc(F.adaptive_avg_pool2d(self.c(F.relu(y)), 1).flatten(1))


def test_misaligned_grouped_conv_is_named_and_kept():
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    model = MisalignedCat().eval()
    pruned, summary, messages = _prune(model, x)
    assert any("'a'" in m and "do not line up with its groups" in m for m in messages)
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.g.in_channels) == (6, 10, 16)
    assert pruned.g.out_channels == 8 and pruned.c.out_channels == 4  # the grouped conv's outputs still go
    assert _masked_diff(model, pruned, summary, x) < 1e-5


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_recurrent_hidden_units(cell, bidirectional):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 8)
    model = RNNClassifier(hidden=16, layers=2, bidirectional=bidirectional, cell=cell).eval()
    pruned, summary, messages = _prune(model, x)
    assert not any("rnn" in m for m in messages)
    rnn, dirs, gates = pruned.rnn, 2 if bidirectional else 1, 4 if cell == "lstm" else 3
    assert rnn.hidden_size == 8 and rnn.input_size == 8 and pruned.fc.in_features == 8 * dirs
    assert tuple(rnn.weight_hh_l1.shape) == (gates * 8, 8) and tuple(rnn.weight_ih_l1.shape) == (gates * 8, 8 * dirs)
    # Removed units produce zeros from a zero state: the pruned layer equals the masked original exactly.
    assert _masked_diff(model, pruned, summary, x) < 1e-5
    assert summary["removed_channels"] == {"rnn": [16, 8]}


class StatefulLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x, h0, c0):
        return self.fc2(F.relu(self.fc1(self.rnn(x, (h0, c0))[0][:, -1])))


def test_recurrent_initial_state_is_named():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 5, 4), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    model = StatefulLSTM().eval()
    with pytest.warns(UserWarning, match="'rnn' is given an initial state"):
        structured_prune(model, StructuredPruning(ratio=0.5), inputs)
    assert model.rnn.hidden_size == 8 and model.fc1.out_features == 8


class Volumes(nn.Module):
    """Conv3d + BatchNorm3d, then a Conv1d over the flattened volume and a ConvTranspose1d."""

    def __init__(self):
        super().__init__()
        self.c3, self.bn3 = nn.Conv3d(2, 8, 3, padding=1), nn.BatchNorm3d(8)
        self.c1, self.bn1 = nn.Conv1d(8, 12, 3, padding=1), nn.BatchNorm1d(12)
        self.up = nn.ConvTranspose1d(12, 6, 2, stride=2)
        self.out = nn.Conv1d(6, 3, 1)

    def forward(self, x):
        y = F.relu(self.bn3(self.c3(x))).flatten(2)
        return self.out(F.relu(self.up(F.relu(self.bn1(self.c1(y))))))


class Decoder2d(nn.Module):
    """ConvTranspose2d upsampling between convs, channels-last friendly."""

    def __init__(self):
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.up, self.bn_up = nn.ConvTranspose2d(8, 6, 2, 2), nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(F.relu(self.bn_up(self.up(F.relu(self.bn(self.c(x)))))))


def _reloads(model: nn.Module, x: torch.Tensor, tmp_path) -> None:
    """A checkpoint of the pruned model rebuilds its new shapes and reproduces its outputs exactly."""
    loaded = torchslim.load(torchslim.save(model, tmp_path / "m.slim"), trusted=type(model).__module__)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("make,shape", [(Volumes, (2, 2, 4, 4, 4)), (Decoder2d, (2, 3, 6, 6))])
def test_conv_nd_and_transposed(make, shape, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    model = _randomise_norms(make())
    pruned, summary, messages = _prune(model, x)
    assert not [m for m in messages if "unpruned" in m]
    convs = [m for m in pruned.modules() if isinstance(m, nn.modules.conv._ConvNd)]
    assert all(c.weight.shape[0] == (c.in_channels if c.transposed else c.out_channels) for c in convs)
    assert len(summary["removed_channels"]) == len(convs) - 1  # all but the output layer
    assert _masked_diff(model, pruned, summary, x) < 1e-5
    _reloads(pruned, x, tmp_path)


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.gn = nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.gn(self.c1(x)))
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.c2(y)), 1).flatten(1))


def test_group_norm_keeps_groups_equal(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = _randomise_norms(GroupNormNet())
    pruned, summary, _ = _prune(model, x)
    assert (pruned.gn.num_groups, pruned.gn.num_channels, pruned.c1.out_channels) == (4, 8, 8)
    kept = summary["kept"]["c1"]  # positions within each group of 4
    assert len(kept) == 2
    expected = model.gn.weight.detach().view(4, 4)[:, kept].flatten()
    assert torch.equal(pruned.gn.weight.detach(), expected)
    assert pruned(x).shape == (2, 3)
    _reloads(pruned, x, tmp_path)


def test_channels_last_layout_is_kept():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    model = _randomise_norms(ResNet18(width=8, blocks=1)).to(memory_format=torch.channels_last)
    pruned, summary, _ = _prune(model, x)
    conv = pruned.features[1].conv1
    assert conv.out_channels == 4 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert _masked_diff(model, pruned, summary, x) < 1e-5


class HandAttention(nn.Module):
    """Attention written by hand: q/k/v Linear layers reshaped to heads, with the head count inferred (-1) or
    written as a constant, and the product spelled out or through scaled_dot_product_attention."""

    def __init__(self, dim: int = 16, heads: int = 4, infer: bool = True, sdpa: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.infer, self.sdpa = heads, dim // heads, infer, sdpa
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, 3)

    def forward(self, x):
        b, t, d = x.shape
        heads, width = (-1, -1) if self.infer else (self.heads, d)
        q, k, v = (f(x).view(b, t, heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        if self.sdpa:
            a = F.scaled_dot_product_attention(q, k, v)
        else:
            a = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim ** 0.5, -1) @ v
        h = x + self.o(a.transpose(1, 2).reshape(b, t, width))
        return self.fc2(F.relu(self.fc1(h.mean(1))))


@pytest.mark.parametrize("sdpa", [False, True])
def test_hand_written_attention_heads(sdpa):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = HandAttention(sdpa=sdpa).eval()
    pruned, summary, _ = _prune(model, x)
    assert summary["removed_channels"]["q"] == [4, 2]  # heads of 4 channels, q/k/v rows and o's inputs
    assert (pruned.q.out_features, pruned.k.out_features, pruned.v.out_features, pruned.o.in_features) == (8,) * 4
    kept_rows = [h * 4 + j for h in summary["kept"]["q"] for j in range(4)]
    assert torch.equal(pruned.k.weight, model.k.weight[kept_rows])
    assert _masked_diff(model, pruned, summary, x) < 1e-5  # zeroed q/k/v rows: those heads add nothing


def test_constant_head_count_is_named():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    model = HandAttention(infer=False).eval()
    pruned, summary, messages = _prune(model, x)
    assert any("'q'" in m and "constant number of heads" in m and "-1" in m for m in messages)
    assert pruned.q.out_features == 16 and pruned.fc1.out_features == 16
    assert _masked_diff(model, pruned, summary, x) < 1e-5


class LinearSE(nn.Module):
    """Squeeze-excitation with Linear layers, the gate viewed back to (b, c, 1, 1)."""

    def __init__(self, constant_view: bool = False):
        super().__init__()
        self.constant_view = constant_view
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.f1, self.f2 = nn.Linear(16, 4), nn.Linear(4, 16)
        self.o, self.fc = nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.c(x))
        b, c = y.shape[:2]
        g = torch.sigmoid(self.f2(F.relu(self.f1(y.mean((2, 3))))))
        g = g.view(-1, 16, 1, 1) if self.constant_view else g.view(b, c, 1, 1)
        return self.fc(F.relu(self.o(y * g)).mean((2, 3)))


def test_linear_squeeze_excitation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = LinearSE().eval()
    pruned, summary, messages = _prune(model, x)
    assert summary["removed_channels"] == {"c": [16, 8], "f1": [4, 2], "o": [8, 4]} and not messages
    assert pruned.f2.out_features == 8 and pruned.o.in_channels == 8
    assert _masked_diff(model, pruned, summary, x) < 1e-5
    # The same gate viewed to a constant 16 channels: pruning them would break the view, so they stay.
    pruned, summary, messages = _prune(LinearSE(constant_view=True).eval(), x)
    assert "c" not in summary["removed_channels"] and any("constant size 16" in m for m in messages)


def test_search_space_and_per_layer_ratios_reach_new_groups():
    from torchslim.pruning.technique import STRUCTURED

    torch.manual_seed(0)
    field = STRUCTURED.search.fields[0]
    for model, x, leader in [(RNNClassifier(hidden=16).eval(), torch.randn(2, 5, 8), "rnn"),
                             (GroupedCatNet(width=8).eval(), torch.randn(2, 3, 16, 16), "mix.0.0"),
                             (HandAttention().eval(), torch.randn(2, 5, 16), "q")]:
        config = StructuredPruning()
        assert leader in [name for name, _ in field.layers(config, model, (x,))]
        applied = STRUCTURED.search.apply(config, {"ratio": {leader: 0.5}})
        pruned, summary, _ = _prune(model, x, applied.ratio)
        assert list(summary["removed_channels"]) == [leader]


class MixedGroups(nn.Module):
    """24 channels read by a conv with groups=4 (6 per group) and one with groups=6 (4 per group), summed."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 24, 1)
        self.g4, self.g6 = nn.Conv2d(24, 12, 3, padding=1, groups=4), nn.Conv2d(24, 12, 3, padding=1, groups=6)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        y = F.relu(self.a(x))
        return self.fc(F.relu(self.g4(y) + self.g6(y)).mean((2, 3)))


def test_channels_read_by_different_group_sizes():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = MixedGroups().eval()
    pruned, summary, messages = _prune(model, x)
    assert not messages
    # Channels must go alike in every group of 6 and of 4: only their common period, 2, is free.
    assert summary["removed_channels"]["a"] == [2, 1] and pruned.a.out_channels == 12
    assert (pruned.g4.in_channels, pruned.g6.in_channels, pruned.g4.groups, pruned.g6.groups) == (12, 12, 4, 6)
    # The sum couples the outputs: 3 per group of g4 and 2 per group of g6, common period 1: kept whole.
    assert pruned.g4.out_channels == 12
    assert _masked_diff(model, pruned, summary, x) < 1e-5
