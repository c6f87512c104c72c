"""Binary (BWN) and ternary (TWN) weights: quantizer values, STE gradients, training, packing, configs."""

import pytest
import torch

from torchslim import ConfigError, TrainConfig, UnstructuredPruning, prune
from torchslim.export import checkpoint as ckpt
from torchslim.metrics import evaluate
from torchslim.quantization.fake import BinaryQuantizer, TernaryQuantizer
from torchslim.quantization.lowbit import BinaryWeights, TernaryWeights, apply_binary, apply_ternary
from torchslim.quantization.modules import QLinear
from torchslim.quantization.qat import QAT, convert, prepare_qat

TRAIN = TrainConfig(epochs=1, lr=1e-3, max_steps=40, progress=False)


def _w(seed=0, shape=(4, 12)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_binary_values_and_ste_gradient():
    w = _w().requires_grad_()
    q = BinaryQuantizer()
    out = q(w)
    alpha = w.detach().abs().mean(1, keepdim=True)
    assert torch.allclose(out, alpha * torch.sign(w.detach()))
    assert set(q.codes(w).unique().tolist()) == {-1, 1}
    g = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    # d/dw [alpha(w) * sign_ste(w)] = alpha * g + sign(w) * sum_j(g_j * sign(w_j)) / n.
    s = torch.sign(w.detach())
    expected = alpha * g + s * (g * s).sum(1, keepdim=True) / w.shape[1]
    assert torch.allclose(w.grad, expected, atol=1e-6)


def test_ternary_threshold_scale_and_gradients():
    w = _w(2)
    q = TernaryQuantizer(4, threshold=0.7)
    codes = q.codes(w)
    delta = 0.7 * w.abs().mean(1, keepdim=True)
    assert torch.equal(codes, ((w > delta).long() - (w < -delta).long()))
    kept = codes != 0
    alpha = (w.abs() * kept).sum(1) / kept.sum(1)
    assert torch.allclose(q(w), alpha[:, None] * codes, atol=1e-6)
    assert 0.2 < (codes == 0).float().mean() < 0.7  # TWN's threshold zeroes a sizeable share
    learned = TernaryQuantizer(4, learned_scale=True)
    wg = w.clone().requires_grad_()
    out = learned(wg)
    assert torch.allclose(learned.alpha.detach(), alpha)  # initialised to the closed form
    g = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))
    out.backward(g)
    assert torch.allclose(learned.alpha.grad, (g * codes).sum(1), atol=1e-5)
    assert torch.allclose(wg.grad, alpha[:, None] * g, atol=1e-6)  # STE: identity through the ternarisation


def test_ternary_training_first_last_8bit_and_size(tmp_path, digits_data, trained_lenet5):
    converted = apply_ternary(trained_lenet5, TernaryWeights(train=TRAIN), data=digits_data.train)
    for name in ("conv2", "fc1"):
        codes = converted.get_submodule(name).weight_codes
        assert converted.get_submodule(name).bits == 2 and set(codes.unique().tolist()) == {-1, 0, 1}
    for name in ("conv1", "fc2"):
        layer = converted.get_submodule(name)
        assert layer.bits == 8 and layer.weight_codes.abs().max() > 1
    assert evaluate(converted, digits_data.test) >= evaluate(trained_lenet5, digits_data.test) - 0.05
    fp32 = ckpt.save(trained_lenet5, tmp_path / "fp32.slim").stat().st_size
    tern = ckpt.save(converted, tmp_path / "tern.slim")
    assert ckpt.read_manifest(tern)["tensors"]["fc1.weight_codes"]["width"] == "trit"
    assert fp32 / tern.stat().st_size >= 14
    x = digits_data.example_inputs(4)[0]
    with torch.no_grad():
        assert torch.equal(ckpt.load(tern)(x), converted(x))


def test_binary_training_and_size(tmp_path, digits_data, trained_lenet5):
    converted = apply_binary(trained_lenet5, BinaryWeights(train=TRAIN), data=digits_data.train)
    assert set(converted.fc1.weight_codes.unique().tolist()) == {-1, 1}
    assert evaluate(converted, digits_data.test) >= evaluate(trained_lenet5, digits_data.test) - 0.08
    fp32 = ckpt.save(trained_lenet5, tmp_path / "fp32.slim").stat().st_size
    path = ckpt.save(converted, tmp_path / "bin.slim")
    assert ckpt.read_manifest(path)["tensors"]["fc1.weight_codes"]["width"] == 1
    assert fp32 / path.stat().st_size >= 20


def test_binary_after_pruning_keeps_zeros_and_float_first_last(digits_data, trained_lenet5):
    pruned = prune(trained_lenet5, UnstructuredPruning(sparsity=0.7))
    mask = pruned.fc1.weight_mask.clone()
    prepared = prepare_qat(pruned, BinaryWeights(first_last_bits=None, train=TRAIN))
    assert type(prepared.conv1) is torch.nn.Conv2d and type(prepared.fc2) is torch.nn.Linear
    converted = convert(prepared)
    assert type(converted.conv1) is torch.nn.Conv2d and isinstance(converted.fc1, QLinear)
    codes = converted.fc1.weight_codes
    assert (codes[mask == 0] == 0).all() and (codes[mask != 0] != 0).all()
    # The binary scale is the mean over the kept weights: the least-squares fit on that support.
    w = (pruned.fc1.weight_orig * mask).detach()
    alpha = w.abs().sum(1) / (w != 0).sum(1)
    assert torch.allclose(converted.fc1.weight_scale.reshape(-1), alpha)


def test_lowbit_configs_validate():
    with pytest.raises(ConfigError, match="threshold"):
        TernaryWeights(threshold=0)
    with pytest.raises(ConfigError, match="threshold"):
        TernaryWeights(threshold=5.0)
    with pytest.raises(ConfigError, match=r"first_last_bits=1 .*\[2, 3"):
        BinaryWeights(first_last_bits=1)
    with pytest.raises(ConfigError, match="apply_binary takes a BinaryWeights"):
        apply_binary(None, QAT(), data=None)
    assert TernaryWeights(keep_first_last=False).layer_plan(torch.nn.Sequential(torch.nn.Linear(2, 2))) != {}
