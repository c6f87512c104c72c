"""Learned compression: sparse variational dropout (pruning) and soft weight-sharing (into shared codebooks)."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import torchslim
from torchslim import ConfigError, DataError, UnsupportedModelError, SoftWeightSharing, TrainConfig, VariationalDropout
from torchslim.data import digits, mnist
from torchslim.pruning import prune, UnstructuredPruning
from torchslim.pruning.variational import kl_approx, log_alpha
from torchslim.quantization import quantize
from torchslim.quantization.sharing import SharedWeight
from torchslim.quantization.soft_sharing import GaussianMixture, _NearNLL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return digits(image_size=8, seed=0)


def _net() -> nn.Sequential:
    """A conv layer and two linear ones on 8x8 digits: small, and both kinds of layer the methods handle."""
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 64, 48), nn.ReLU(),
                         nn.Linear(48, 10))


LAYERS = ("0", "3", "5")  # conv, fc1, fc2


@pytest.fixture(scope="module")
def trained(data):
    torch.manual_seed(0)
    model = _net()
    torchslim.train(model, data.train, TrainConfig(epochs=6, lr=3e-3, progress=False))
    return model.eval()


def _vd(kl_weight=1.0, steps=120, **kw):
    return VariationalDropout(kl_weight=kl_weight, warmup=0.2, train=TrainConfig(max_steps=steps, lr=1e-2,
                                                                                 progress=False), **kw)


def _zeros(model):
    return {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}


# ----------------------------------------------------------------------------------------------
# Sparse variational dropout


def test_kl_approximation_is_finite_and_decreases_with_log_alpha():
    la = torch.linspace(-8, 8, 161)
    per_weight = torch.stack([kl_approx(v.reshape(1)) for v in la])
    assert torch.isfinite(per_weight).all()
    assert (per_weight.diff() < 0).all()  # noisier weights cost less: the prior pushes towards dropping them
    assert per_weight[-1] < 1e-3 < per_weight[0]  # ~0 for a weight that is all noise
    assert kl_approx(la) == pytest.approx(float(per_weight.sum()), rel=1e-5)
    # log alpha of a zero weight stays finite (clamped), as does the KL's gradient
    theta = torch.zeros(3, requires_grad=True)
    kl_approx(log_alpha(theta, torch.full((3,), -10.0))).backward()
    assert torch.isfinite(theta.grad).all()


def test_vd_prunes_real_zeros_and_leaves_a_plain_masked_model(data, trained):
    torch.manual_seed(0)
    out = prune(trained, _vd(), data=data.train)
    names = {n for n, _ in out.named_parameters()}
    assert names == {f"{n}.{p}" for n in LAYERS for p in ("weight_orig", "bias")}
    assert not any("log_sigma2" in k for k in out.state_dict())
    assert {type(m) for m in out.modules()} == {nn.Sequential, nn.Conv2d, nn.ReLU, nn.Flatten, nn.Linear}
    zeros = _zeros(out)
    assert zeros["3"] > 0.3, zeros  # the largest layer is largely noise
    for n in zeros:
        m = out.get_submodule(n)
        assert torch.equal(m.weight == 0, m.weight_mask == 0)
    assert torchslim.evaluate(out, data.test) > 0.8  # the pruned network still classifies
    assert out.torchslim_history[-1]["type"] == "VariationalDropout"
    assert _zeros(trained)["3"] == 0  # the input model is untouched


def test_vd_kl_weight_sets_how_much_is_pruned_and_runs_repeat(data, trained):
    def run(kl):
        torch.manual_seed(0)  # a fresh loader each time: a shared one's shuffling moves on between runs
        return prune(trained, _vd(kl), data=digits(image_size=8, seed=0).train)

    weak, strong, again = run(0.05), run(1.0), run(1.0)
    assert _zeros(strong)["3"] > _zeros(weak)["3"] + 0.2
    assert all(torch.equal(a, b) for a, b in zip(strong.state_dict().values(), again.state_dict().values()))


def test_vd_keeps_earlier_masks_and_reloads_exactly(data, trained, tmp_path):
    torch.manual_seed(0)
    masked = prune(trained, UnstructuredPruning(sparsity=0.5, scope="layer"))
    before = {n: masked.get_submodule(n).weight_mask.clone() for n in LAYERS}
    out = prune(masked, _vd(steps=40), data=data.train)
    for n, mask in before.items():
        assert not out.get_submodule(n).weight_mask[mask == 0].any()  # pruned weights stay pruned
    torchslim.save(out, tmp_path / "vd.slim")
    loaded = torchslim.load(tmp_path / "vd.slim")
    x = next(iter(data.test))[0]
    assert torch.equal(loaded(x), out.eval()(x))


def test_vd_config_and_input_errors(data, trained):
    with pytest.raises(ConfigError, match="warmup"):
        VariationalDropout(warmup=1.5)
    with pytest.raises(ConfigError, match="exclude"):
        VariationalDropout(exclude="fc1")
    with pytest.raises((ConfigError, DataError), match="data"):
        prune(trained, _vd())
    with pytest.raises(ConfigError, match="fc9"):
        prune(trained, _vd(exclude=("fc9",)), data=data.train)
    with pytest.raises(UnsupportedModelError, match="no Linear/Conv2d"):
        prune(nn.Sequential(nn.ReLU()), _vd(), data=data.train)


# ----------------------------------------------------------------------------------------------
# Soft weight-sharing


def _full_nll(w, means, log_var, log_mix):
    d = w.reshape(-1, 1) - means
    return -torch.logsumexp(log_mix - 0.5 * (math.log(2 * math.pi) + log_var + d * d * torch.exp(-log_var)), 1).sum()


@pytest.mark.parametrize("components", [2, 3])
def test_mixture_nll_is_exact_with_up_to_two_nonzero_components(components):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(40, generator=g, dtype=torch.float64) * 0.1).requires_grad_()
    means = torch.tensor([0.0, -0.1, 0.12][:components], dtype=torch.float64, requires_grad=True)
    log_var = torch.tensor([-6.0, -5.0, -5.5][:components], dtype=torch.float64, requires_grad=True)
    log_mix = torch.log_softmax(torch.randn(components, generator=g, dtype=torch.float64), 0).requires_grad_()
    args = (w, means, log_var, log_mix)
    with torch.no_grad():
        assert float(_NearNLL.apply(*args)) == pytest.approx(float(_full_nll(*args)), rel=1e-12)
    assert torch.autograd.gradcheck(_NearNLL.apply, args)


def test_mixture_merges_close_components_and_keeps_the_zero():
    cfg = SoftWeightSharing(components=4, merge=1.0)
    mix = GaussianMixture(torch.linspace(-0.3, 0.3, 50), cfg)
    with torch.no_grad():
        mix._means.copy_(torch.tensor([-0.2, 0.1, 0.105, 0.3]) / 0.2)  # _MEAN_RATE
        mix._log_var.fill_(2 * math.log(0.01) / 6.0)  # sigma 0.01 everywhere (_VAR_RATE)
    means, _, log_mix = mix.merged()
    assert means.tolist() == pytest.approx([0.0, -0.2, 0.1025, 0.3])
    assert float(torch.logsumexp(log_mix, 0)) == pytest.approx(0.0, abs=1e-9)  # proportions still sum to 1


def _soft(**kw):
    adam = TrainConfig(max_steps=40, lr=5e-3, progress=False)
    return SoftWeightSharing(**{"components": 6, "zero_mixing": 0.9, "train": adam,
                                "settle": adam.replace(max_steps=10), **kw})


def test_soft_sharing_makes_codebooks_with_an_exact_zero_and_reloads_exactly(data, trained, tmp_path):
    torch.manual_seed(0)
    out = quantize(trained, _soft(), data=data.train)
    shared = {n: m for n, m in out.named_modules() if isinstance(m, SharedWeight)}
    assert set(shared) == set(LAYERS)
    for name, m in shared.items():
        values = torch.unique(m.weight.detach())
        assert 0.0 in values.tolist()  # the zero component's weights are exactly zero
        assert 2 <= values.numel() <= 6 + 1  # at most one value per component, plus zero
        assert torch.equal(values[values != 0], torch.unique(m.codebook.detach()))
        assert (m.codes == 0).any() and m.codebook.numel() <= 6
    assert out.torchslim_history[-1]["type"] == "SoftWeightSharing"
    assert torchslim.evaluate(out, data.test) > 0.5
    path = torchslim.save(out, tmp_path / "soft.slim")
    encodings = {v["encoding"] for k, v in torchslim.read_manifest(path)["tensors"].items() if k.endswith(".codes")}
    assert encodings and "dense" not in encodings  # codes go through the checkpoint's compact encodings
    loaded = torchslim.load(path)
    x = next(iter(data.test))[0]
    assert torch.equal(loaded(x), out.eval()(x))


def test_soft_sharing_after_vd_keeps_pruned_weights_zero(data, trained):
    torch.manual_seed(0)
    pruned = prune(trained, _vd(steps=60), data=data.train)
    masks = {n: pruned.get_submodule(n).weight_mask.clone() for n in LAYERS}
    out = quantize(pruned, _soft(settle=None), data=data.train)
    for n, mask in masks.items():
        assert not out.get_submodule(n).codes[mask == 0].any()


def test_soft_sharing_errors(trained):
    with pytest.raises(ConfigError, match="gamma"):
        SoftWeightSharing(gamma=(1.0, -1.0))
    with pytest.raises(ConfigError, match="components"):
        SoftWeightSharing(components=0)
    with pytest.raises((ConfigError, DataError), match="data"):
        quantize(trained, _soft())


# ----------------------------------------------------------------------------------------------
# The benchmark's learned variants, reduced


def _benchmark():
    spec = importlib.util.spec_from_file_location("deep_compression_learned",
                                                  ROOT / "benchmarks" / "deep_compression.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_reduced_learned_variants(tmp_path, data_dir):
    bench = _benchmark()
    baseline_cfgs, plans = bench.quick_plans(steps=6)
    data = mnist(data_dir, subset=1200, seed=0)
    chosen = {v: plans["lenet300"][v] for v in ("vd", "soft_sharing")}
    entries = bench.run_model("lenet300", data, chosen, baseline_cfgs["lenet300"], tmp_path, log=lambda s: None)
    assert [e["variant"] for e in entries] == ["vd", "soft_sharing"]
    for e in entries:
        assert e["final_bytes"] == Path(e["checkpoint"]).stat().st_size
        assert e["loaded_equals_in_memory"] and e["bytes"]["estimate_matches"]
        assert any(layer["density"] < 1 for layer in e["layers"])
        assert f"ratio>={bench.TARGET_RATIO[('lenet300', e['variant'])]:g}" in e["targets"]
    assert {"prune", "recover", "share", "polish"} <= set(entries[0]["seconds"])
    best = bench.best_variants(entries)["lenet300"]
    within = [e for e in entries if e["final_error"] <= e["baseline_error"] + bench.ERROR_SLACK_POINTS + 1e-9]
    assert best["variant"] == (max(within, key=lambda e: e["ratio"]) if within
                               else min(entries, key=lambda e: e["final_error"]))["variant"]


def test_merge_keeps_earlier_entries_with_the_same_baseline(tmp_path):
    import json

    bench = _benchmark()
    old = {"models": [{"model": "lenet300", "variant": "paper", "baseline_error": 1.5},
                      {"model": "lenet5", "variant": "paper", "baseline_error": 0.7},
                      {"model": "lenet5", "variant": "vd", "baseline_error": 0.7}],
           "settings": {"lenet300": {"paper": {"x": 1}}}}
    (tmp_path / "deep_compression.json").write_text(json.dumps(old))
    now = [{"model": "lenet5", "variant": "vd", "baseline_error": 0.7},
           {"model": "lenet300", "variant": "vd", "baseline_error": 1.6}]
    settings = {}
    kept = bench.merged_entries(tmp_path / "deep_compression.json", now, settings)
    # lenet300/paper had another baseline; lenet5/vd was run again
    assert [(e["model"], e["variant"]) for e in kept] == [("lenet5", "paper")]
    assert settings == {}
