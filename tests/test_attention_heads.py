"""Structured pruning of nn.MultiheadAttention heads: PrunedMultiheadAttention reproduces nn.MultiheadAttention,
heads go by magnitude/Taylor/Hessian importance, the pruned model equals the head-masked original, what stays
is named, and the replacement saves, loads and exports to ONNX."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as ts
from torchslim.export.onnx import onnx_agreement
from torchslim.metrics.profile import count_macs
from torchslim.nn.attention import PrunedMultiheadAttention
from torchslim.pruning import StructuredPruning, masked_like, structured_prune


def _attention(bias: bool, batch_first: bool, extra: bool, kdim: int | None) -> nn.MultiheadAttention:
    m = nn.MultiheadAttention(8, 2, bias=bias, batch_first=batch_first, add_bias_kv=extra, add_zero_attn=extra,
                              kdim=kdim, vdim=kdim).eval()
    with torch.no_grad():
        for p in m.parameters():  # biases start at zero: give them values so that copying them is checked
            p.normal_(0, 0.5)
    return m


MASKS = ("none", "bool", "float", "padding", "both", "per-head", "causal")


@pytest.mark.parametrize("bias,batch_first,extra,kdim", list(itertools.product([True, False], [True, False],
                                                                             [False, True], [None, 5])))
def test_replacement_reproduces_multihead_attention(bias, batch_first, extra, kdim):
    torch.manual_seed(0)
    mha = _attention(bias, batch_first, extra, kdim)
    new = PrunedMultiheadAttention.from_attention(mha).eval()
    assert new.num_heads == 2 and new.head_dim == 4
    b, n = 3, 4
    seq = (lambda t, e: torch.randn(b, t, e)) if batch_first else (lambda t, e: torch.randn(t, b, e))
    padding = torch.zeros(b, n, dtype=torch.bool)
    padding[0, -2:] = True
    hidden = torch.rand(n, n) > 0.6
    hidden[:, 0] = False  # no query sees every key masked (softmax of nothing is NaN in both)
    for mask, need_weights, average in itertools.product(MASKS, [True, False], [True, False]):
        q = seq(n, 8)
        k, v = (q, q) if kdim is None else (seq(n, kdim), seq(n, kdim))
        kw = {"bool": {"attn_mask": hidden}, "float": {"attn_mask": torch.randn(n, n)},
              "padding": {"key_padding_mask": padding}, "both": {"attn_mask": hidden, "key_padding_mask": padding},
              "per-head": {"attn_mask": torch.randn(b * 2, n, n)},
              "causal": {"attn_mask": nn.Transformer.generate_square_subsequent_mask(n), "is_causal": True},
              }.get(mask, {})
        with torch.no_grad():
            want, want_w = mha(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
            got, got_w = new(q, k, v, need_weights=need_weights, average_attn_weights=average, **kw)
        # float32 rounding (the fused kernel sums in another order): 1e-6 relative to the output's scale
        assert (got - want).abs().max() < 1e-6 * max(1.0, want.abs().max().item()), (mask, need_weights, average)
        if need_weights:
            assert got_w.shape == want_w.shape and (got_w - want_w).abs().max() < 1e-6
        else:
            assert got_w is None and want_w is None
    x = torch.randn(n, 8)  # unbatched
    if kdim is None:
        with torch.no_grad():
            assert all((a - c).abs().max() < 1e-5 for a, c in zip(mha(x, x, x), new(x, x, x)))


def test_replacement_trains_like_the_original():
    torch.manual_seed(0)
    mha = _attention(True, True, False, None).train()
    new = PrunedMultiheadAttention.from_attention(mha)
    x = torch.randn(2, 5, 8)
    mha(x, x, x)[0].square().sum().backward()
    new(x, x, x)[0].square().sum().backward()
    for got, want in ((new.q_proj.weight.grad, mha.in_proj_weight.grad[:8]),
                      (new.v_proj.weight.grad, mha.in_proj_weight.grad[16:]),
                      (new.out_proj.weight.grad, mha.out_proj.weight.grad)):
        assert (got - want).abs().max() < 1e-5 * want.abs().max()


class AttentionNet(nn.Module):
    def __init__(self, heads: int = 4, need_weights: bool = True):
        super().__init__()
        self.need_weights = need_weights
        self.embed = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, heads, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.attn(h, h, h, need_weights=self.need_weights)[0]
        return self.fc2(F.relu(self.fc1(h.mean(1))))


def _net(**kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return AttentionNet(**kw).eval(), torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(1))


def _prune(model, x, config, **kw):
    pruned = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = structured_prune(pruned, config, (x,), **kw)
    return pruned, summary, [str(w.message) for w in caught]


@pytest.mark.parametrize("importance", ["l1", "taylor", "hessian"])
def test_heads_are_removed_and_equal_the_masked_original(importance):
    model, x = _net()
    data = [(x, torch.tensor([0, 1, 2, 0]))] * 2
    pruned, summary, _ = _prune(model, x, StructuredPruning(ratio=0.5, importance=importance), data=data)
    attn = pruned.attn
    assert isinstance(attn, PrunedMultiheadAttention) and attn.num_heads == 2 and attn.head_dim == 4
    assert summary["removed_channels"]["attn"] == [4, 2] and len(summary["kept"]["attn"]) == 2
    assert attn.q_proj.out_features == attn.v_proj.out_features == attn.out_proj.in_features == 8
    # the channels it reads (embed's outputs) and its output channels (read by fc1) are pruned too
    assert (attn.embed_dim, attn.kdim, attn.out_dim) == (8, 8, 8) == (pruned.embed.out_features,) * 3
    with torch.no_grad():
        assert (pruned(x) - masked_like(model, summary)(x)).abs().max() < 1e-5
    assert count_macs(pruned, (x,)) < 0.6 * count_macs(model, (x,))


def test_head_choice_follows_magnitude():
    model, x = _net()
    with torch.no_grad():  # heads 1 and 3 (rows 4-7, 12-15 of each projection) get tiny weights
        w = model.attn.in_proj_weight.view(3, 4, 4, 16)
        w[:, [1, 3]] *= 1e-3
        model.attn.out_proj.weight.view(16, 4, 4)[:, [1, 3]] *= 1e-3
    _, summary, _ = _prune(model, x, StructuredPruning(ratio=0.5))
    assert summary["kept"]["attn"] == [0, 2]


def test_ratio_exclude_and_at_least_one_head():
    model, x = _net()
    pruned, summary, _ = _prune(model, x, StructuredPruning(ratio=0.9, scope="layer"))
    assert pruned.attn.num_heads == 1
    pruned, summary, _ = _prune(model, x, StructuredPruning(ratio={"attn": 0.5}, scope="layer"))
    assert pruned.attn.num_heads == 2 and set(summary["removed_channels"]) == {"attn"}
    pruned, summary, _ = _prune(model, x, StructuredPruning(ratio=0.5, exclude=["attn"]))
    assert type(pruned.attn) is nn.MultiheadAttention and pruned.attn.in_proj_weight.shape == (48, 16)
    assert set(summary["removed_channels"]) == {"fc1"}
    pruned, summary, _ = _prune(model, x, StructuredPruning(ratio=0.5, scope="global", max_ratio=0.75))
    assert 1 <= pruned.attn.num_heads < 4


def test_replacement_is_pruned_again_and_saves_loads_and_exports(tmp_path):
    model, x = _net()
    pruned, _, _ = _prune(model, x, StructuredPruning(ratio=0.5))
    again, summary, _ = _prune(pruned, x, StructuredPruning(ratio=0.5))
    assert again.attn.num_heads == 1 and summary["removed_channels"]["attn.q_proj"] == [2, 1]
    with torch.no_grad():
        assert (again(x) - masked_like(pruned, summary)(x)).abs().max() < 1e-5
        out = again(x)
    loaded = ts.load(ts.save(again, tmp_path / "m.slim"), trusted=[AttentionNet.__module__])
    assert isinstance(loaded.attn, PrunedMultiheadAttention) and loaded.attn.num_heads == 1
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    ts.export_onnx(again, (x,), tmp_path / "m.onnx")
    assert onnx_agreement(again, tmp_path / "m.onnx", [(x,)]).max_abs_diff < 1e-4
    # later techniques replace its projections: it still saves and loads, and is no longer pruned
    svd = ts.decompose(pruned, ts.SVD(ratio=0.5, require_saving=False, progress=False), example_inputs=(x,))
    q = ts.quantize(svd, ts.DynamicQuantization(), example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(ts.load(ts.save(q, tmp_path / "q.slim"), trusted=[AttentionNet.__module__])(x), q(x))
    _, summary, _ = _prune(svd, x, StructuredPruning(ratio=0.5))
    assert any("are no longer nn.Linear layers" in s["reason"] for s in summary["skipped"])


def test_what_is_kept_is_named():
    model, x = _net()

    class Cross(AttentionNet):  # query and key/value from different layers: one in_proj_weight reads both
        def forward(self, x):
            h = self.embed(x)
            return self.fc2(F.relu(self.fc1(self.attn(h, h + 1, h + 1)[0].mean(1))))

    class Weights(AttentionNet):  # the attention weights are used: fewer heads would change them
        def forward(self, x):
            out, w = self.attn(self.embed(x), self.embed(x), self.embed(x))
            return self.fc2(F.relu(self.fc1(out.mean(1)))) + w.sum()

    class PerHead(AttentionNet):  # a (batch * heads, L, S) mask names the original heads
        def forward(self, x):
            h = self.embed(x)
            mask = torch.zeros(16, 5, 5, device=x.device)
            return self.fc2(F.relu(self.fc1(self.attn(h, h, h, attn_mask=mask + x[:1, :1, :1])[0].mean(1))))

    for cls, why in ((Cross, "reads different query, key and value through one in_proj_weight"),
                     (PerHead, "is given a per-head attn_mask; its heads are kept"),
                     (Weights, "the attention weights of MultiheadAttention 'attn' are used")):
        torch.manual_seed(0)
        net = cls().eval()
        pruned, summary, messages = _prune(net, x, StructuredPruning(ratio=0.5))
        assert any(why in m for m in messages), messages
        assert any(why in s["reason"] for s in summary["skipped"])
    assert pruned.attn.num_heads == 4
