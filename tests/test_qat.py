"""Fake quantization (STE, min/max, LSQ), QAT prepare/convert, pruning masks, checkpoint packing, bad input."""

import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim import ConfigError, DataError, TorchslimError, TrainConfig, UnsupportedModelError, train
from torchslim.export import checkpoint as ckpt
from torchslim.metrics import evaluate
from torchslim.models import LeNet5
from torchslim.quantization.fake import FakeQuantize, LSQQuantizer, MinMaxQuantizer
from torchslim.quantization.codecs import decode_intpack, encode_intpack
from torchslim.quantization.modules import QConv2d, QLinear, QuantConv2d, QuantLinear
from torchslim.quantization.qat import QAT, apply_qat, calibrate, convert, prepare_qat, quantizable_layers
from torchslim.quantization.spec import QuantSpec

FAST = TrainConfig(epochs=1, lr=1e-4, max_steps=15, progress=False)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- quantizers


def test_fake_quantize_matches_torch_reference_and_ste_mask():
    x = (torch.randn(6, 5, generator=_gen()) * 3).requires_grad_()
    scale = torch.rand(6, generator=_gen(1)) * 0.2 + 0.05
    zero = torch.randint(-3, 4, (6,), generator=_gen(2))
    ours = FakeQuantize.apply(x, scale[:, None], zero[:, None], -8, 7)
    ours.backward(torch.ones_like(ours))
    x_ref = x.detach().clone().requires_grad_()
    ref = torch.fake_quantize_per_channel_affine(x_ref, scale, zero.int(), 0, -8, 7)
    ref.backward(torch.ones_like(ref))
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.equal(x.grad, x_ref.grad)
    # The STE passes the gradient inside the range and blocks it where values were clipped.
    q = torch.round(x.detach() / scale[:, None]) + zero[:, None]
    assert torch.equal(x.grad.bool(), (q >= -8) & (q <= 7))
    assert 0 < x.grad.sum() < x.numel()


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_minmax_round_trip_error_and_integer_range(bits, granularity, symmetric):
    spec = QuantSpec(bits=bits, symmetric=symmetric, granularity=granularity, group_size=4)
    w = torch.randn(8, 16, generator=_gen(bits))
    q = MinMaxQuantizer(spec)
    codes = q.codes(w)
    assert codes.min() >= spec.qmin and codes.max() <= spec.qmax
    scale, zero = q.qparams(w)
    out = q(w)
    assert torch.allclose(out, spec.dequantize(codes, scale, zero), atol=1e-6)
    # Inside the min/max range the error of round-to-nearest is at most half a step.
    blocks = w.reshape(8, 4, 4) if granularity == "group" else w
    err = (out - w).abs().reshape(blocks.shape)
    assert (err <= scale / 2 + 1e-6).all()
    levels = spec.qmax - spec.qmin + 1
    assert levels <= 2 ** bits
    assert q(torch.zeros_like(w)).abs().max() == 0  # zero is exactly representable


def test_zero_weights_quantize_to_exact_zero():
    w = torch.randn(4, 10, generator=_gen())
    w[:, ::3] = 0
    for symmetric in (True, False):
        q = MinMaxQuantizer(QuantSpec(bits=4, symmetric=symmetric, granularity="channel"))
        assert (q(w)[w == 0] == 0).all()
    w[1] = 0  # a fully pruned channel
    lsq = LSQQuantizer(QuantSpec(bits=4, granularity="channel"), 4)
    assert (lsq(w)[w == 0] == 0).all() and (lsq.codes(w)[w == 0] == 0).all()
    # The step starts from the unpruned weights only (LSQ init 2*mean|w|/sqrt(Qp)); the dead channel gets a
    # typical step instead of zero.
    alive = w[0][w[0] != 0].abs().mean()
    assert lsq.step[0].item() == pytest.approx(2 * alive.item() / math.sqrt(7), rel=1e-5)
    assert lsq.step[1] > 0
    with pytest.raises(DataError, match="every weight is zero"):
        LSQQuantizer(QuantSpec(bits=4), where="fc9 weight")(torch.zeros(3, 3))


def test_lsq_init_and_gradients():
    spec = QuantSpec(bits=3)  # signed symmetric: codes -3..3, Qp = 3
    x = torch.tensor([[-2.0, -0.3, 0.05, 0.4, 1.1, 5.0]])
    q = LSQQuantizer(spec)
    q(x)
    qp = 3
    assert q.step.item() == pytest.approx(2 * x.abs().mean().item() / math.sqrt(qp))
    with torch.no_grad():
        q.step.fill_(0.5)
    xg = x.clone().requires_grad_()
    out = q(xg)
    assert torch.allclose(out, torch.tensor([[-1.5, -0.5, 0.0, 0.5, 1.0, 1.5]]))
    out.sum().backward()
    v = x / 0.5
    inside = (v > -qp) & (v < qp)
    # LSQ step gradient: round(v/s) - v/s inside, -Qn / Qp when clipped, scaled by g = 1/sqrt(N*Qp).
    expected = torch.where(inside, torch.round(v) - v, torch.where(v <= -qp, -float(qp), float(qp))).sum()
    g = 1 / math.sqrt(x.numel() * qp)
    assert q.step.grad.item() == pytest.approx(expected.item() * g, rel=1e-5)
    assert torch.equal(xg.grad, inside.float())  # STE for the input


def test_lsq_activation_sign_from_first_batch():
    relu_out = torch.relu(torch.randn(4, 10, generator=_gen()))
    q = LSQQuantizer(QuantSpec(bits=4), activation=True)
    q(relu_out)
    assert q.code_range() == (0, 15)
    q2 = LSQQuantizer(QuantSpec(bits=4), activation=True)
    q2(torch.randn(4, 10, generator=_gen()))
    assert q2.code_range() == (-7, 7)


def test_observed_ranges_calibrate_then_ema():
    q = MinMaxQuantizer(QuantSpec(bits=8, symmetric=False, signed=False), observe=True, momentum=0.5)
    q.start_calibration()
    q(torch.tensor([0.0, 1.0]))
    q(torch.tensor([-1.0, 0.5]))
    q.stop_calibration()
    assert (q.lo.item(), q.hi.item()) == (-1.0, 1.0)  # running min/max while calibrating
    q.train()
    q(torch.tensor([0.0, 3.0]))
    assert q.hi.item() == pytest.approx(2.0)  # EMA while training
    q.eval()
    q(torch.tensor([0.0, 100.0]))
    assert q.hi.item() == pytest.approx(2.0)  # frozen in eval


# ---------------------------------------------------------------------------------------------- QAT


def test_qat_prepare_convert_is_exact_and_leaves_model(digits_data, trained_lenet5):
    before = {k: v.clone() for k, v in trained_lenet5.state_dict().items()}
    cfg = QAT(bits=4, activation_bits=8, train=FAST)
    prepared = prepare_qat(trained_lenet5, cfg)
    assert isinstance(prepared.conv1, QuantConv2d) and isinstance(prepared.fc1, QuantLinear)
    calibrate(prepared, digits_data.train, 2)
    train(prepared, digits_data.train, cfg.train)
    converted = convert(prepared)
    assert isinstance(converted.conv2, QConv2d) and isinstance(converted.fc2, QLinear)
    for layer in (converted.conv1, converted.conv2, converted.fc1, converted.fc2):
        assert layer.weight_codes.dtype == torch.int8
        assert layer.weight_codes.min() >= -7 and layer.weight_codes.max() <= 7
        assert layer.input_range == (0, 255)
    x = digits_data.example_inputs(16)[0]
    prepared.eval()
    with torch.no_grad():
        assert torch.equal(prepared(x), converted(x))
        # Inference decodes the integer weights once; a changed scale is seen (by value, even through .data).
        assert converted.fc1.dequantized_weight() is converted.fc1.dequantized_weight()
        y = converted(x)
        converted.fc2.weight_scale.data.mul_(2)
        assert not torch.equal(converted(x), y)
        converted.fc2.weight_scale.data.div_(2)
        assert torch.equal(converted(x), y)
    # The user's model is untouched.
    assert type(trained_lenet5.conv1) is nn.Conv2d
    assert all(torch.equal(v, trained_lenet5.state_dict()[k]) for k, v in before.items())
    assert evaluate(converted, digits_data.test) >= evaluate(trained_lenet5, digits_data.test) - 0.03


def test_apply_qat_lsq_converges(digits_data, trained_lenet5):
    cfg = QAT(bits=4, learned_step=True, train=TrainConfig(epochs=1, lr=1e-4, max_steps=25, progress=False))
    converted = apply_qat(trained_lenet5, cfg, data=digits_data.train, calibration_data=digits_data.val)
    assert converted.fc1.input_range == (0, 15 * 17)  # ReLU'd input: unsigned 8-bit
    assert evaluate(converted, digits_data.test) >= evaluate(trained_lenet5, digits_data.test) - 0.03


def test_qat_after_pruning_keeps_zeros(digits_data, trained_lenet5):
    from torchslim import UnstructuredPruning, prune

    pruned = prune(trained_lenet5, UnstructuredPruning(sparsity=0.8))
    masks = {n: pruned.get_submodule(n).weight_mask.clone() for n in ("conv1", "conv2", "fc1", "fc2")}
    prepared = prepare_qat(pruned, QAT(bits=4, learned_step=True, train=FAST))
    assert hasattr(prepared.fc1, "weight_mask")  # the mask moved to the QAT wrapper
    train(prepared, digits_data.train, FAST)
    for n, mask in masks.items():
        layer = prepared.get_submodule(n)
        assert (layer.weight_quant(layer.weight)[mask == 0] == 0).all()
    converted = convert(prepared)
    for n, mask in masks.items():
        codes = converted.get_submodule(n).weight_codes
        assert (codes[mask == 0] == 0).all()
        assert (codes != 0).sum() <= mask.sum()


def test_prepared_model_trains_with_distillation(digits_data, trained_lenet5):
    from torchslim.distillation import Distillation, distill

    prepared = prepare_qat(trained_lenet5, QAT(bits=4, learned_step=True))
    step_before = prepared.fc1.weight_quant.step.detach().clone()
    cfg = Distillation(feature_layers={"fc1": "fc1"}, train=TrainConfig(epochs=1, lr=1e-4, max_steps=10,
                                                                         progress=False))
    distill(prepared, cfg, teacher=trained_lenet5, data=digits_data.train, inplace=True)
    assert not torch.equal(prepared.fc1.weight_quant.step, step_before)  # LSQ steps train under distillation
    converted = convert(prepared)
    assert evaluate(converted, digits_data.test) >= evaluate(trained_lenet5, digits_data.test) - 0.03


def test_quantized_checkpoint_is_packed_and_round_trips(tmp_path, digits_data, trained_lenet5):
    prepared = prepare_qat(trained_lenet5, QAT(bits=4, activation_bits=8))
    calibrate(prepared, digits_data.train, 2)
    converted = convert(prepared)
    fp32 = ckpt.save(trained_lenet5, tmp_path / "fp32.slim")
    path = ckpt.save(converted, tmp_path / "q4.slim")
    entries = ckpt.read_manifest(path)["tensors"]
    assert entries["fc1.weight_codes"]["encoding"] == "intpack"
    assert entries["fc1.weight_codes"]["width"] == 4
    assert fp32.stat().st_size / path.stat().st_size >= 7.5
    loaded = ckpt.load(path)
    assert isinstance(loaded.fc1, QLinear) and loaded.fc1.input_range == (0, 255)
    x = digits_data.example_inputs(8)[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), converted(x))
    # A prepared (fake-quant) model checkpoints too, e.g. to resume QAT.
    ckpt.save(prepared, tmp_path / "prepared.slim")
    back = ckpt.load(tmp_path / "prepared.slim").eval()
    prepared.eval()
    with torch.no_grad():
        assert torch.equal(back(x), prepared(x))


def test_load_in_a_fresh_process(tmp_path, digits_data, trained_lenet5):
    """``torchslim.load`` of a converted model must work without importing torchslim.quantization first:
    importing any part of torchslim registers quantization's codecs and its codes encoding."""
    import os
    import subprocess
    import sys

    prepared = prepare_qat(trained_lenet5, QAT(bits=4, activation_bits=None))
    path = ckpt.save(convert(prepared), tmp_path / "q4.slim")
    code = ("import sys; from torchslim.export.checkpoint import load; m = load(sys.argv[1]); "
            "print(type(m.fc1).__name__, int(m.fc1.weight_codes.abs().max()))")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["QLinear", "7"]


@pytest.mark.parametrize("values,width", [("binary", 1), ((-1, 1), "trit"), ((-7, 7), 4), ((-127, 127), 8),
                                          ((0, 4), 3), ((5, 5), 0)])
def test_intpack_round_trip_and_width(values, width):
    lo, hi = (-1, 1) if values == "binary" else values
    t = torch.randint(lo, hi + 1, (37, 11), generator=_gen(hi)).to(torch.int8)
    if values == "binary":
        t = torch.where(t >= 0, 1, -1).to(torch.int8)
    parts, meta = encode_intpack(t)
    assert meta["width"] == width
    entry = {"shape": list(t.shape), "dtype": "int8", **meta}
    assert torch.equal(decode_intpack(parts, entry), t)
    raw_bits = {0: 0, "trit": 1.6}.get(width, width)
    assert parts["data"].numel() <= math.ceil(t.numel() * raw_bits / 8) + 1
    sparse = torch.tensor([0, 0, 3, 0, -100, 0] * 50, dtype=torch.int16)  # non-contiguous value table
    p, m = encode_intpack(sparse)
    assert torch.equal(decode_intpack(p, {"shape": [300], "dtype": "int16", **m}), sparse)
    assert encode_intpack(torch.randn(4)) is None
    assert encode_intpack(torch.arange(300, dtype=torch.int16)) is None


# ---------------------------------------------------------------------------------------------- bad input


class _WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 4, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.rnn(self.emb(x))[0][:, -1])


def test_configs_round_trip_through_dicts():
    from torchslim.core.config import config_from_dict
    from torchslim.quantization.lowbit import BinaryWeights, TernaryWeights
    from torchslim.quantization.mixed import MixedPrecision

    for cfg in (QAT(bits=4, exclude=("fc*",), train=FAST), BinaryWeights(first_last_bits=None),
                TernaryWeights(learned_scale=True), MixedPrecision(candidate_bits=(2, 4), finetune=None)):
        assert config_from_dict(cfg.to_dict()) == cfg


def test_bad_configs_are_named():
    with pytest.raises(ConfigError, match=r"bits=1.*BinaryWeights"):
        QAT(bits=1)
    with pytest.raises(ConfigError, match=r"bits=9.*\[2, 3, 4, 5, 6, 7, 8, 16\]"):
        QAT(bits=9)
    with pytest.raises(ConfigError, match="activation_bits"):
        QAT(activation_bits=0)
    with pytest.raises(ConfigError, match="symmetric"):
        QAT(learned_step=True, symmetric=False)
    with pytest.raises(ConfigError, match="unsupported"):
        QAT(unsupported="ignore")


def test_unsupported_layers_warn_or_raise():
    model = _WithEmbedding()
    with pytest.warns(UserWarning, match=r"emb \(Embedding\).*rnn \(LSTM\)"):
        prepared = prepare_qat(model, QAT(activation_bits=None))
    assert isinstance(prepared.fc, QuantLinear) and type(prepared.emb) is nn.Embedding
    with pytest.raises(UnsupportedModelError, match="emb"):
        prepare_qat(model, QAT(unsupported="raise"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(quantizable_layers(model, exclude=("emb", "rnn"))) == ["fc"]
    attn = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.MultiheadAttention(4, 2))
    with pytest.warns(UserWarning, match=r"1 \(MultiheadAttention\)"):
        layers = quantizable_layers(attn)
    assert list(layers) == ["0"]  # out_proj is read directly by the attention kernel: not swapped
    with pytest.raises(UnsupportedModelError, match="no layer to quantize"):
        prepare_qat(model, QAT(exclude=("*",)))
    with pytest.raises(UnsupportedModelError, match="already quantized"):
        prepare_qat(prepare_qat(LeNet5(), QAT()), QAT())


def test_bad_calibration_data_is_named():
    prepared = prepare_qat(LeNet5(), QAT())
    empty = DataLoader(TensorDataset(torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="empty"):
        calibrate(prepared, empty)
    constant = DataLoader(TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long)), batch_size=4)
    with pytest.raises(DataError, match="conv1 input.*constant|conv1 input.*every calibration value"):
        calibrate(prepare_qat(LeNet5(), QAT()), constant)
    nan = torch.randn(8, 1, 28, 28)
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(TorchslimError, match="conv1 input.*NaN"):
        calibrate(prepare_qat(LeNet5(), QAT()), DataLoader(TensorDataset(nan, torch.zeros(8)), batch_size=4))
    with pytest.raises(TorchslimError, match="conv1 input.*NaN"):
        calibrate(prepare_qat(LeNet5(), QAT(learned_step=True)), DataLoader(TensorDataset(nan), batch_size=4))
    with pytest.raises(TorchslimError, match="never observed"):
        convert(prepare_qat(LeNet5(), QAT()))
