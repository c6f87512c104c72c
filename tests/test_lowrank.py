"""Low-rank decomposition: exactness at full rank, structure, costs, rank selection, skips and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.config import config_from_dict
from torchslim.core.history import history
from torchslim.data import digits
from torchslim.core.errors import ConfigError, DataError
from torchslim.lowrank import CP, SVD, Tucker, cp_conv, cp_to_sequence, decompose, summarize
from torchslim.metrics import count_macs, count_params, evaluate
from torchslim.models import LeNet300, SmallMobileNet, SmallResNet
from torchslim.training.train import TrainConfig, train

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def _decompose(model, config, example_inputs=None, **kwargs):
    """``decompose``, plus the per-layer report it records in the model's history."""
    new = decompose(model, config, example_inputs=example_inputs, **kwargs)
    assert history(new)[-1]["type"] == type(config).__name__
    return new, history(new)[-1]["report"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Two shared cores: extra intra-op threads only spin against other processes' work.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _decomposed_are_plain(model: nn.Module, report: dict) -> None:
    """Decomposed layers are nn.Sequential of plain Linear / Conv2d, which checkpoints rebuild from specs."""
    for name, entry in report.items():
        if entry["skipped"] is None:
            m = model.get_submodule(name)
            assert type(m) is nn.Sequential and all(type(c) in (nn.Linear, nn.Conv2d) for c in m), name


def _quiet(cfg):
    return cfg.replace(progress=False)


def test_configs_validate_and_round_trip():
    for cfg in (SVD(rank={"fc1": 8}), SVD(energy=0.9), Tucker(ranks=(4, 6)), Tucker(ranks={"a": 3, "b": [2, 5]}),
                Tucker(ratio=0.3, exclude=("stem.*",)), CP(rank=8), CP(max_drop=0.01)):
        assert config_from_dict(cfg.to_dict()) == cfg
    assert Tucker(ranks={"b": [2, 5]}).ranks == {"b": (2, 5)}
    for bad in (lambda: SVD(), lambda: SVD(rank=4, energy=0.9), lambda: SVD(rank=0), lambda: SVD(ratio=1.0),
                lambda: Tucker(ranks=(1, 2, 3)), lambda: Tucker(energy=0.0), lambda: CP(energy=0.9),
                lambda: SVD(rank=3, exclude="fc1")):
        with pytest.raises(ConfigError):
            bad()


def test_svd_full_rank_reproduces_and_leaves_original_alone():
    torch.manual_seed(0)
    model = LeNet300().eval()
    before = copy.deepcopy(model.state_dict())
    new, report = _decompose(model, _quiet(SVD(rank=300, require_saving=False)), (X,))
    # Global rank 300 is more than fc2 (300x100) and fc3 (100x10) can hold: skipped, not an error.
    assert report["fc1"]["skipped"] is None and report["fc1"]["rank"] == 300
    assert "exceeds the maximum 100" in report["fc2"]["skipped"]
    full, report = _decompose(model, _quiet(SVD(rank={"fc1": 300, "fc2": 100, "fc3": 10}, require_saving=False)))
    assert (full(X) - model(X)).abs().max() < 1e-4
    assert all(e["error"] < 1e-6 for e in report.values())
    seq = full.fc1
    assert isinstance(seq, nn.Sequential) and [type(m) for m in seq] == [nn.Linear, nn.Linear]
    assert seq[0].bias is None and seq[0].out_features == 300 and seq[1].bias is not None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.fc1, nn.Linear)
    _decomposed_are_plain(full, report)


def test_svd_ratio_energy_and_costs():
    torch.manual_seed(0)
    model = LeNet300().eval()
    new, report = _decompose(model, _quiet(SVD(ratio=0.3, exclude=("fc3",))), (X[:1],))
    for name in ("fc1", "fc2"):
        e = report[name]
        assert e["skipped"] is None and e["params_after"] <= 0.3 * e["params_before"]
        # The largest such rank: one more would break the budget.
        assert (e["rank"] + 1) * (new.get_submodule(name)[0].in_features + new.get_submodule(name)[1].out_features) \
            + new.get_submodule(name)[1].out_features > 0.3 * e["params_before"]
    assert report["fc3"]["skipped"] == "excluded by config.exclude"
    s = summarize(report)
    assert count_params(new)[0] == count_params(model)[0] - s["params_before"] + s["params_after"]
    macs_drop = sum(e["macs_before"] - e["macs_after"] for e in report.values())
    assert count_macs(model, (X[:1],)) - count_macs(new, (X[:1],)) == macs_drop

    _, report = _decompose(model, _quiet(SVD(energy=0.8, layers=("fc1",))))
    sv = torch.linalg.svdvals(model.fc1.weight.detach().double())
    cum = torch.cumsum(sv ** 2, 0) / (sv ** 2).sum()
    r = report["fc1"]["rank"]
    assert cum[r - 1] >= 0.8 and cum[r - 2] < 0.8
    assert report["fc2"]["skipped"] == "not selected by config.layers"
    assert abs(report["fc1"]["error"] - float((1 - cum[r - 1]).sqrt())) < 1e-6


def test_no_saving_skipped_and_rank_errors():
    model = LeNet300()
    _, report = _decompose(model, _quiet(SVD(rank={"fc1": 8, "fc3": 10})))
    assert report["fc1"]["skipped"] is None
    assert report["fc3"]["skipped"].startswith("no saving at rank 10: 1110 params vs 1010")
    assert report["fc3"]["params_after"] == report["fc3"]["params_before"]
    assert report["fc2"]["skipped"] == "no rank given for this layer"
    with pytest.raises(ConfigError, match="layer 'fc2': rank 101 exceeds the maximum 100"):
        decompose(model, _quiet(SVD(rank={"fc2": 101})))
    with pytest.raises(ConfigError, match="not Linear layers"):
        decompose(model, _quiet(SVD(rank={"fc9": 3})))
    with pytest.raises(ConfigError, match="expects an SVD, Tucker or CP"):
        decompose(model, TrainConfig())


@pytest.mark.parametrize("kwargs", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                    dict(stride=(2, 1), padding=(1, 0), bias=False),
                                    dict(padding=1, padding_mode="reflect")])
def test_tucker_full_rank_reproduces(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 10, 3, **kwargs), nn.ReLU())
    x = torch.randn(2, 6, 13, 11)
    new, report = _decompose(model, _quiet(Tucker(ranks=(6, 10), require_saving=False)), (x,))
    entry = report["0"]
    assert entry["skipped"] is None and entry["rank"] == [6, 10]
    assert (new(x) - model(x)).abs().max() < 1e-4
    first, core, last = new[0]
    assert (first.kernel_size, first.in_channels, first.out_channels) == ((1, 1), 6, 6)
    assert core.stride == model[0].stride and core.dilation == model[0].dilation
    assert core.padding == model[0].padding and core.padding_mode == model[0].padding_mode
    assert (last.kernel_size, last.out_channels, last.bias is None) == ((1, 1), 10, model[0].bias is None)
    assert count_macs(new, (x[:1],)) == entry["macs_after"]


def test_tucker_on_resnet_cuts_macs_and_skips_what_it_cannot_handle():
    torch.manual_seed(0)
    model = SmallResNet(widths=(8, 16), blocks=(1, 1)).eval()
    new, report = _decompose(model, _quiet(Tucker(ratio=0.4)), (X[:1],))
    assert count_macs(new, (X[:1],)) < count_macs(model, (X[:1],))
    assert report["layers.0.conv1"]["skipped"] is None
    s = summarize(report)
    assert count_params(new)[0] == count_params(model)[0] - s["params_before"] + s["params_after"]
    _decomposed_are_plain(new, report)
    # The stem (1 -> 8 channels, 72 weights) needs at least 18 parameters at rank (1, 1).
    _, report = _decompose(model, _quiet(Tucker(ratio=0.2, layers=("stem.*",))))
    assert report["stem.0"]["skipped"] == "ratio 0.2 unreachable: the smallest rank needs 18 of 72 params"

    mobile = SmallMobileNet(width=8, expand=2)
    _, report = _decompose(mobile, _quiet(Tucker(ratio=0.5)), (X[:1],))
    assert "grouped convolution (groups=" in report["blocks.0.depthwise.0"]["skipped"]
    _, report = _decompose(mobile, _quiet(CP(rank=2)), (X[:1],))
    assert "grouped convolution" in report["blocks.0.depthwise.0"]["skipped"]

    class MyConv(nn.Conv2d):
        pass

    odd = nn.Sequential(MyConv(4, 4, 3))
    _, report = _decompose(odd, _quiet(Tucker(ranks=2)))
    assert "subclass of Conv2d" in report["0"]["skipped"]
    with pytest.raises(ConfigError, match=r"layer '0': ranks \[2, 9\] exceeds the maximum \[4, 4\]"):
        decompose(nn.Sequential(nn.Conv2d(4, 4, 3)), _quiet(Tucker(ranks={"0": (2, 9)})))


@pytest.mark.parametrize("kwargs", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2),
                                    dict(stride=(2, 1), padding=(1, 0), bias=False), dict(padding="same"),
                                    dict(padding=1, stride=2, padding_mode="circular")])
def test_cp_structure_is_exact_for_exact_factors(kwargs):
    rng = np.random.default_rng(0)
    rank = 5
    conv = nn.Conv2d(6, 8, 3, **kwargs).double()
    lam, factors = rng.standard_normal(rank), [rng.standard_normal((d, rank)) for d in (8, 6, 3, 3)]
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(np.einsum("r,or,ir,hr,wr->oihw", lam, *factors)))
    seq = cp_to_sequence(conv, lam, factors)
    x = torch.randn(2, 6, 11, 13, dtype=torch.float64)
    assert (seq(x) - conv(x)).abs().max() < 1e-10
    first, vertical, horizontal, last = seq
    assert (first.kernel_size, first.out_channels) == ((1, 1), rank)
    assert (vertical.kernel_size, vertical.groups, horizontal.kernel_size, horizontal.groups) == \
        ((3, 1), rank, (1, 3), rank)
    assert (vertical.stride[0], horizontal.stride[1]) == conv.stride
    assert (last.out_channels, last.bias is None) == (8, conv.bias is None)


def test_cp_fit_high_rank_small_error_and_report():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, stride=2))
    x = torch.randn(2, 8, 10, 10)
    new, report = _decompose(model, _quiet(CP(rank=48, require_saving=False)), (x,))
    entry = report["0"]
    assert entry["skipped"] is None and entry["error"] < 1e-3
    ref = model(x) - model[0].bias[None, :, None, None]
    assert ((new(x) - model(x)).norm() / ref.norm()) < 1e-3
    assert count_macs(new, (x[:1],)) == entry["macs_after"]
    # A low rank on the same layer saves parameters; its reported error is the kernel's real error.
    seq, err = cp_conv(model[0], 4)
    assert 0.3 < err < 1 and sum(p.numel() for p in seq.parameters()) < sum(p.numel() for p in model.parameters())


def test_sensitivity_scan_on_trained_mlp():
    data = digits(batch_size=64)
    torch.manual_seed(0)
    model = LeNet300()
    train(model, data.train, TrainConfig(epochs=2, lr=2e-3, device="cpu", progress=False))
    new, report = _decompose(model, _quiet(SVD(max_drop=0.02, scan_batches=2, exclude=("fc3",))),
                             val_data=data.val)
    for name in ("fc1", "fc2"):
        e = report[name]
        assert e["skipped"] is None and e["accuracy_drop"] <= 0.02
        assert e["params_after"] < e["params_before"] and e["macs_after"] is not None
    assert evaluate(new, data.val) > evaluate(model, data.val) - 0.06
    with pytest.raises(ConfigError, match="pass val_data="):
        decompose(model, SVD(max_drop=0.01))
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="empty"):
        decompose(model, SVD(max_drop=0.01), val_data=empty)
    # The old form, data= a Splits (its val split), still works and warns.
    with pytest.warns(DeprecationWarning, match="val_data"):
        old = decompose(model, _quiet(SVD(max_drop=0.02, scan_batches=2, exclude=("fc3",))), data=data)
    assert history(old)[-1]["report"] == report
