"""Second-order compression: OBD importance, SparseGPT (OBS) reconstruction and GPTQ, on small seeded problems."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchslim
from torchslim.core.errors import ConfigError, DataError
from torchslim.nn.hessian import layer_rows
from torchslim.pruning import layer_sparsity
from torchslim.pruning.importance import fisher_diagonal
from torchslim.pruning.obs import sparsegpt
from torchslim.quantization.backends.weight_only import WeightOnlyLinear, quantize_groups
from torchslim.quantization.gptq import gptq_codes


def _correlated(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Mostly low-rank, like real activations: the regime where reconstruction beats magnitude.
    low = torch.randn(n, d // 4, generator=g) @ torch.randn(d // 4, d, generator=g)
    return low + 0.3 * torch.randn(n, d, generator=g)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return 2 * x.t() @ x / x.shape[0]


def _error(x: torch.Tensor, w: torch.Tensor, w2: torch.Tensor) -> float:
    return float(((x @ w.t() - x @ w2.t()) ** 2).mean())


def _magnitude(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = round(sparsity * w.numel())
    out = w.clone().flatten()
    out[w.abs().flatten().argsort()[:k]] = 0
    return out.view_as(w)


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_obs_reconstructs_a_layer_better_than_magnitude(sparsity):
    x = _correlated(1024, 96)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    new, keep = sparsegpt(w, _hessian(x), sparsity=sparsity, block_size=32)
    assert int((~keep).sum()) == round(sparsity * w.numel())
    assert torch.equal(new == 0, ~keep | (new == 0)) and bool((new[~keep] == 0).all())
    assert _error(x, w, new) < 0.8 * _error(x, w, _magnitude(w, sparsity))


def test_obs_keeps_earlier_zeros_and_skips_dead_inputs():
    x = _correlated(512, 32)
    x[:, 3] = 0  # an input the calibration data never uses
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    earlier = torch.zeros_like(w, dtype=torch.bool)
    earlier[0, :5] = True
    new, keep = sparsegpt(w, _hessian(x), sparsity=0.5, pruned=earlier)
    assert bool((new[earlier] == 0).all()) and not keep[earlier].any()
    assert bool((new[:, 3] == 0).all())


def test_layer_rows_unfold_like_the_convolution():
    torch.manual_seed(0)
    for conv, x in ((nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1), torch.randn(2, 3, 9, 9)),
                    (nn.Conv1d(3, 5, 3, padding=2, dilation=2), torch.randn(2, 3, 11))):
        rows = layer_rows(conv, x)
        y = conv(x)
        manual = rows @ conv.weight.reshape(5, -1).t() + conv.bias
        assert torch.allclose(manual, y.flatten(2).transpose(1, 2).reshape(-1, 5), atol=1e-5)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _batches(n: int = 4, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(_correlated(64, 32, seed + i), torch.randint(0, 10, (64,), generator=g)) for i in range(n)]


def _output_error(a: nn.Module, b: nn.Module, data) -> float:
    with torch.no_grad():
        return sum(float(((a(x) - b(x)) ** 2).mean()) for x, _ in data)


def test_obs_model_pruning_meets_per_layer_rates_and_beats_magnitude():
    model, data = _mlp(), _batches()
    rates = {"0": 0.7, "2": 0.4}
    obs = torchslim.prune(model, torchslim.UnstructuredPruning(rates, method="obs"), data=data)
    mag = torchslim.prune(model, torchslim.UnstructuredPruning(rates), data=data)
    got = layer_sparsity(obs)
    assert abs(got["0"] - 0.7) < 0.01 and abs(got["2"] - 0.4) < 0.01
    assert _output_error(model, obs, data) < 0.7 * _output_error(model, mag, data)
    assert hasattr(obs[0], "weight_mask") and not hasattr(model[0], "weight_mask")  # masked copy, original intact


def test_obs_global_scope_takes_the_magnitude_shares():
    model, data = _mlp(), _batches()
    pruned = torchslim.prune(model, torchslim.UnstructuredPruning(0.6, method="obs"), data=data)
    mag = layer_sparsity(torchslim.prune(model, torchslim.UnstructuredPruning(0.6)))
    assert layer_sparsity(pruned) == pytest.approx(mag, abs=0.01) and mag["0"] != pytest.approx(mag["2"], abs=0.01)


def test_obs_needs_calibration_data_and_names_grouped_convs():
    with pytest.raises(ConfigError, match="data="):
        torchslim.prune(_mlp(), torchslim.UnstructuredPruning(0.5, method="obs"))
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3))
    data = [torch.randn(8, 4, 10, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.warns(RuntimeWarning, match=r"for 0 \(grouped convolution"):
        pruned = torchslim.prune(model, torchslim.UnstructuredPruning(0.5, method="obs", scope="layer"), data=data)
    assert layer_sparsity(pruned) == pytest.approx({"0": 0.5, "2": 0.5}, abs=0.01)


def test_fisher_diagonal_is_the_mean_squared_gradient():
    model, data = _mlp(), _batches(2)
    params = {"w": model[2].weight}
    fisher = fisher_diagonal(model, params, data, batches=2, splits=1)["w"]
    expected = torch.zeros_like(model[2].weight)
    for x, y in data:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        expected += model[2].weight.grad ** 2 / 2
    assert torch.allclose(fisher, expected, rtol=1e-5, atol=1e-12)
    assert model[2].weight.grad is not None  # the caller's gradients are restored (here: the last manual one)


def test_hessian_importance_prunes_weights_the_loss_ignores_first():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4))
    with torch.no_grad():
        model[0].weight[:, 0] = 5.0  # the largest weights, on an input that is always zero
    data = []
    for i in range(3):
        x = torch.randn(32, 8, generator=torch.Generator().manual_seed(i))
        x[:, 0] = 0
        data.append((x, torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(10 + i))))
    obd = torchslim.prune(model, torchslim.UnstructuredPruning(0.125, method="hessian"), data=data)
    mag = torchslim.prune(model, torchslim.UnstructuredPruning(0.125))
    assert bool((obd[0].weight[:, 0] == 0).all())
    assert bool((mag[0].weight[:, 0] != 0).all())
    with pytest.raises(ConfigError, match="data="):
        torchslim.prune(model, torchslim.UnstructuredPruning(0.5, method="hessian"))


def test_structured_hessian_importance_runs_and_needs_data():
    model, data = _mlp(), _batches()
    x = data[0][0]
    pruned = torchslim.prune(model, torchslim.StructuredPruning(0.5, importance="hessian"), data=data,
                             example_inputs=x)
    assert pruned[0].out_features == 32 and pruned(x).shape == (64, 10)
    with pytest.raises(ConfigError, match="data="):
        torchslim.prune(model, torchslim.StructuredPruning(0.5, importance="hessian"), example_inputs=x)


def test_bad_second_order_configs():
    with pytest.raises(ConfigError, match="method"):
        torchslim.UnstructuredPruning(method="sparsegpt")
    with pytest.raises(ConfigError, match="gradual"):
        torchslim.UnstructuredPruning(method="obs", schedule=torchslim.Schedule(
            kind="gradual", steps=2, finetune=torchslim.TrainConfig(epochs=1)))
    with pytest.raises(ConfigError, match="damp"):
        torchslim.UnstructuredPruning(method="obs", damp=0.0)
    with pytest.raises(ConfigError, match="method"):
        torchslim.WeightOnly(method="awq")


def _dequantize(u, scale, bits, g):
    half = 2 ** (bits - 1)
    return ((u.float().reshape(u.shape[0], -1, g) - half) * scale.float()[..., None]).reshape(u.shape)


@pytest.mark.parametrize("bits,group", [(4, 32), (2, 16), (4, 96)])
def test_gptq_error_is_below_round_to_nearest(bits, group):
    x = _correlated(1024, 96, seed=3)
    w = torch.randn(32, 96, generator=torch.Generator().manual_seed(4))
    u, scale, zero = gptq_codes(w, _hessian(x), bits, group)
    assert zero is None and u.dtype == torch.uint8 and int(u.min()) >= 1 and int(u.max()) < 2 ** bits
    u2, scale2, _ = quantize_groups(w, bits, group)
    assert _error(x, w, _dequantize(u, scale, bits, group)) < 0.9 * _error(x, w, _dequantize(u2, scale2, bits, group))


def test_gptq_act_order_uses_static_group_scales_and_beats_rtn():
    x = _correlated(1024, 64, seed=7)
    x[:, :8] *= 10  # a few inputs dominate the Hessian
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(8))
    u, scale, _ = gptq_codes(w, _hessian(x), 3, 16, act_order=True)
    u2, scale2, _ = quantize_groups(w, 3, 16)
    assert torch.equal(scale, scale2)  # static groups: scales of the weights before any update
    assert _error(x, w, _dequantize(u, scale, 3, 16)) < 0.9 * _error(x, w, _dequantize(u2, scale2, 3, 16))
    with pytest.raises(ConfigError, match="act_order"):
        torchslim.WeightOnly(act_order=True)


def test_gptq_asymmetric_codes_match_their_scales():
    x = _correlated(512, 64, seed=5)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)) + 0.5
    u, scale, zero = gptq_codes(w, _hessian(x), 4, 32, symmetric=False)
    deq = ((u.float().reshape(16, 2, 32) - zero.float()[..., None]) * scale.float()[..., None]).reshape(16, 64)
    u2, s2, z2 = quantize_groups(w, 4, 32, symmetric=False)
    rtn = ((u2.float().reshape(16, 2, 32) - z2.float()[..., None]) * s2.float()[..., None]).reshape(16, 64)
    assert _error(x, w, deq) < _error(x, w, rtn)


@pytest.mark.parametrize("bits", [2, 3])
def test_weight_only_gptq_model_round_trips_a_checkpoint(tmp_path, bits):
    model, data = _mlp(), _batches()
    gptq = torchslim.quantize(model, torchslim.WeightOnly(bits=bits, group_size=0, method="gptq"), data=data)
    rtn = torchslim.quantize(model, torchslim.WeightOnly(bits=bits, group_size=0), data=data)
    assert gptq[0].packed.shape == (64, (32 * bits + 7) // 8) and int(gptq[0].codes().max()) < 2 ** bits
    assert isinstance(gptq[0], WeightOnlyLinear) and gptq[0].group_size == 32 and gptq[2].group_size == 64
    assert _output_error(model, gptq, data) < _output_error(model, rtn, data)
    torchslim.save(gptq, tmp_path / "q.slim")
    again = torchslim.load(tmp_path / "q.slim")
    x = data[0][0]
    with torch.no_grad():
        assert torch.equal(again(x), gptq(x))
    with pytest.raises(ConfigError, match="data="):
        torchslim.quantize(model, torchslim.WeightOnly(method="gptq"))
    with pytest.raises(DataError, match="no batches"):
        torchslim.quantize(model, torchslim.WeightOnly(method="gptq"), data=[])


def test_weight_only_gptq_folds_pruning_masks():
    model, data = _mlp(), _batches()
    pruned = torchslim.prune(model, torchslim.UnstructuredPruning(0.5))
    q = torchslim.quantize(pruned, torchslim.WeightOnly(bits=4, group_size=32, method="gptq"), data=data)
    assert isinstance(q[0], WeightOnlyLinear) and isinstance(q[2], WeightOnlyLinear)
    assert _output_error(pruned, q, data) < 0.1 * _output_error(model, pruned, data) + 1e-3


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(24, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 24, bias=False)
        self.head.weight = self.emb.weight  # tied, as in language models

    def forward(self, x):
        return self.head(torch.relu(self.mid(self.emb(x)))).mean(1)


def test_gptq_leaves_tied_weights_of_other_layers_alone():
    model = _Tied()
    data = [torch.randint(0, 24, (8, 5), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    emb = model.emb.weight.detach().clone()
    with pytest.warns(UserWarning, match="stay in float: emb"):
        q = torchslim.quantize(model, torchslim.WeightOnly(bits=4, group_size=16, method="gptq"), data=data)
    assert isinstance(q.mid, WeightOnlyLinear) and isinstance(q.head, WeightOnlyLinear)
    assert torch.equal(q.emb.weight, emb) and torch.equal(model.emb.weight, emb)
