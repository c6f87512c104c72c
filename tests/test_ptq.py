"""Post-training quantization: static int8 on ONNX Runtime kernels, dynamic int8, weight-only, fp8 math."""

import copy
import warnings

import pytest
import torch
from torch import nn

from torchslim.core.config import config_from_dict
from torchslim.core.errors import ConfigError, DataError, UnsupportedModelError
from torchslim.export.checkpoint import load, save
from torchslim.export.onnx import array, to_onnx_proto
from torchslim.metrics import evaluate
from torchslim.models import SmallResNet
from torchslim.quantization.backends import STATIC_BACKENDS
from torchslim.quantization.backends.cuda import E4M3_MAX, Fp8Linear, fp8_dequantize, fp8_quantize, fp8_supported
from torchslim.quantization.backends.dynamic import DynamicInt8Linear, DynamicInt8RNN
from torchslim.metrics import count_macs
from torchslim.quantization.backends.onnxrt import QuantizedGraphModel, calibrate_graph, quantize_graph
from torchslim.nn.bitpack import pack_bits, unpack_bits
from torchslim.quantization.backends.weight_only import WeightOnlyLinear, quantize_groups
from torchslim.quantization.observers import make_observer
from torchslim.quantization.convert import apply_dynamic, apply_fp8, apply_weight_only
from torchslim.quantization.ptq import ACTIVATION_SPEC, DynamicQuantization, Float8, StaticQuantization, WeightOnly
from torchslim.quantization.static import apply_static


def _state(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def static_lenet(trained_lenet5, digits_data):
    before = _state(trained_lenet5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # LeNet-5 has an int8 kernel for every layer: no warning
        q = apply_static(trained_lenet5, StaticQuantization(calibration_batches=4), calibration_data=digits_data.train)
    assert _same_state(before, _state(trained_lenet5))  # the input model is untouched
    return q


# ----------------------------------------------------------------------------------------------
# Static int8


def test_static_int8_keeps_accuracy_and_runs_integer_kernels(static_lenet, trained_lenet5, digits_data):
    fp32 = evaluate(trained_lenet5, digits_data.test)
    int8 = evaluate(static_lenet, digits_data.test)
    assert int8 >= fp32 - 0.015  # 359 test images: one image is 0.28 points
    assert static_lenet.info["float_layers"] == []
    assert static_lenet.info["check"]["top1_agreement"] >= 0.95
    graph = static_lenet.to_onnx()
    ops = [n.op_type for n in graph.graph.node]
    if static_lenet.backend != "ort_qdq":  # QOperator graph (ONNX Runtime or lowered to PyTorch)
        assert ops.count("QLinearConv") == 2 and ops.count("QGemm") == 2 and "Conv" not in ops
    else:  # every Conv/Gemm reads dequantized int8 activations and weights, and its output is requantized
        producer = {o: n.op_type for n in graph.graph.node for o in n.output}
        compute = [n for n in graph.graph.node if n.op_type in ("Conv", "Gemm")]
        assert len(compute) == 4
        assert all(producer.get(i) == "DequantizeLinear" for n in compute for i in n.input)
    weights = {i.name: i for i in graph.graph.initializer if i.name.endswith("weight_quantized")}
    assert len(weights) == 4 and all(i.data_type == 3 for i in weights.values())  # int8
    assert static_lenet.backend in STATIC_BACKENDS
    measured = static_lenet.info["backend_latency_ms"]
    assert static_lenet.backend == min(measured, key=measured.get)  # auto kept the fastest it measured
    assert set(measured) | set(static_lenet.info["backends_skipped"]) == set(STATIC_BACKENDS)
    x = digits_data.example_inputs(4)
    assert count_macs(static_lenet, x) == count_macs(trained_lenet5, x) > 0  # the graph's work is reported


def test_static_int8_checkpoint_round_trip(static_lenet, digits_data, tmp_path):
    path = save(static_lenet, tmp_path / "q.slim")
    back = load(path)
    assert isinstance(back, QuantizedGraphModel) and back.backend == static_lenet.backend
    x = digits_data.example_inputs(64)[0]
    assert torch.equal(back(x), static_lenet(x))
    assert back.info == static_lenet.info
    codes = back.tensors[[k for k in back.tensors.keys() if k.endswith("weight_quantized")][0]]
    assert codes.dtype == torch.int8 and -127 <= int(codes.min()) and int(codes.max()) <= 127
    twin = copy.deepcopy(static_lenet)
    assert torch.equal(twin(x), static_lenet(x))


def test_observer_qparams_are_the_graph_qparams(trained_lenet5, digits_data):
    x = digits_data.example_inputs(64)[0]
    proto = to_onnx_proto(trained_lenet5, (x,))
    # Fixed batches: the shared training loader's order depends on how often other tests iterated it.
    x_val = next(iter(digits_data.val))[0]
    batches = [(array(x_val[i:i + 64]),) for i in (0, 64, 128)]
    scales = {}
    for name in ("minmax", "entropy"):
        observers = calibrate_graph(proto, batches, lambda layer, n=name: make_observer(n, ACTIVATION_SPEC,
                                                                                        layer=layer))
        graph = quantize_graph(proto, observers, fmt="qdq")
        inits = {i.name: i for i in graph.graph.initializer}
        from onnx import numpy_helper

        # The activation after fc1's ReLU: its scale in the graph is exactly the observer's.
        relu = next(n.output[0] for n in proto.graph.node if n.op_type == "Relu" and
                    any("fc1" in i for p in proto.graph.node if p.output[0] == n.input[0] for i in p.input))
        expected, zero = observers[relu].qparams()
        got = float(numpy_helper.to_array(inits[relu + "_scale"]))
        assert got == pytest.approx(float(expected), rel=1e-6)
        assert int(numpy_helper.to_array(inits[relu + "_zero_point"])) == int(zero) == 0
        scales[name] = got
    assert scales["entropy"] < scales["minmax"]  # entropy clips the tail: observer choice matters


def test_static_resnet_folds_bn_and_quantizes_residual_adds():
    torch.manual_seed(0)
    model = SmallResNet(in_channels=1, widths=(8, 16, 16), blocks=(1, 1, 1)).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(32, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        q = apply_static(model, StaticQuantization(backend="ort_qop", observer="percentile", calibration_batches=2),
                         calibration_data=[x[:16], x[16:]])
    ops = [n.op_type for n in q.to_onnx().graph.node]
    assert "BatchNormalization" not in ops and q.info["conv_bn_folded"] == "torch.fx"
    assert ops.count("QLinearAdd") == 3 and "QLinearGlobalAveragePool" in ops
    with torch.no_grad():
        ref = model(x)
    assert (q(x) - ref).abs().max() < 0.1 * ref.abs().max()


def test_pytorch_int8_lowering_matches_onnx_runtime(trained_lenet5, digits_data, tmp_path):
    from torchslim.quantization.backends.torch_int8 import ENGINES, engine_available

    backends = [b for b in ENGINES if engine_available(b)]
    if not backends:
        pytest.skip("this PyTorch build has no quantized CPU engine")
    x = digits_data.example_inputs(64)[0]
    calib = [b for b, _ in zip((b[0] for b in digits_data.train), range(2))]
    ref = apply_static(trained_lenet5, StaticQuantization(backend="ort_qop", calibration_batches=2),
                       calibration_data=calib)
    expected = ref(x)
    step = float(next(v for k, v in ref.tensors.items() if k.endswith("linear_1_scale")))  # output step
    for backend in backends:  # the same QOperator graph on PyTorch's kernels
        lowered = QuantizedGraphModel.from_onnx(ref.to_onnx(), backend=backend)
        out = lowered(x)
        assert (out - expected).abs().max() <= 2 * step + 1e-6  # integer kernels agree to within rounding
        assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.98
        back = load(save(lowered, tmp_path / f"{backend}.slim"))
        assert back.backend == backend and torch.equal(back(x), out)


class _Tanh(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_static_layers_without_int8_kernel_warn_or_raise():
    torch.manual_seed(0)
    model = _Tanh().eval()
    data = [torch.randn(16, 16) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"act \(Tanh\)"):
        q = apply_static(model, StaticQuantization(backend="ort_qdq"), calibration_data=data)
    assert [d["layer"] for d in q.info["float_layers"]] == ["act"]
    assert all("Tanh" in q.info["backends_skipped"].get(b, "Tanh") for b in ("torch_onednn", "torch_x86"))
    assert (q(data[0]) - model(data[0])).abs().max() < 0.05
    with pytest.raises(UnsupportedModelError, match=r"act \(Tanh\)"):
        apply_static(model, StaticQuantization(backend="ort_qdq", on_unsupported="raise"), calibration_data=data)


def test_static_bad_calibration_data():
    model = _Tanh().eval()
    with pytest.raises(DataError, match="empty"):
        apply_static(model, StaticQuantization(), calibration_data=[])
    with pytest.raises(DataError, match="calibration data"):
        apply_static(model, StaticQuantization())
    with pytest.raises(DataError, match="constant"):
        apply_static(model, StaticQuantization(backend="ort_qdq"), calibration_data=[torch.ones(8, 16)])
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.fc2.weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="fc2.*NaN"):
        apply_static(broken, StaticQuantization(backend="ort_qdq"), calibration_data=[torch.randn(8, 16)])


def test_static_config_validation_and_round_trip():
    cfg = StaticQuantization(observer="entropy", exclude=("fc*",))
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="bits=4.*WeightOnly"):
        StaticQuantization(bits=4)
    with pytest.raises(ConfigError, match="observer"):
        StaticQuantization(observer="kl")
    with pytest.raises(ConfigError, match="backend"):
        StaticQuantization(backend="tensorrt")
    with pytest.raises(ConfigError, match="on_unsupported"):
        StaticQuantization(on_unsupported="ignore")


# ----------------------------------------------------------------------------------------------
# Dynamic int8


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.init_kwargs = {}
        self.conv = nn.Conv1d(4, 8, 3)
        self.lstm = nn.LSTM(8, 32, num_layers=2, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(64, 16, batch_first=True)
        self.fc = nn.Linear(16, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.conv(x).transpose(1, 2)
        x, _ = self.lstm(x)
        x, _ = self.gru(x)
        return self.head(torch.relu(self.fc(x[:, -1])))


def test_dynamic_quantization_close_to_float_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = _Seq().eval()
    before = _state(model)
    x = torch.randn(8, 4, 12)
    with pytest.warns(UserWarning, match=r"conv \(Conv1d"):
        q = apply_dynamic(model, DynamicQuantization())
    assert _same_state(before, _state(model))
    assert isinstance(q.lstm, DynamicInt8RNN) and isinstance(q.gru, DynamicInt8RNN)
    assert isinstance(q.fc, DynamicInt8Linear) and q.fc.weight_int8.dtype == torch.int8
    with torch.no_grad():
        ref, out = model(x), q(x)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max() + 1e-3
    assert not torch.equal(out, ref)
    back = load(save(q, tmp_path / "dyn.slim"), trusted=[__name__])
    with torch.no_grad():
        assert torch.equal(back(x), out)


def test_dynamic_linear_kernels_agree_with_their_reference():
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    x = torch.randn(10, 48)
    for kernel in ("fbgemm", "int_mm"):
        q = DynamicInt8Linear.from_float(lin, kernel=kernel)
        with torch.no_grad():
            fast = q(x)
            ref = torch.nn.functional.linear(q._reference_input(x), q.dequantized_weight(), q.bias)
            assert (fast - ref).abs().max() < 2e-3
            assert (fast - lin(x)).abs().max() < 0.05
    codes = q.weight_int8
    assert codes.abs().max() == 127  # per-channel symmetric: every row reaches the end of the range


def test_dynamic_policies_and_errors():
    model = _Seq()
    with pytest.raises(UnsupportedModelError, match=r"conv \(Conv1d"):
        apply_dynamic(model, DynamicQuantization(on_unsupported="raise"))
    q = apply_dynamic(model, DynamicQuantization(layers=("Linear",), exclude=("conv", "lstm", "gru")))
    assert isinstance(q.lstm, nn.LSTM) and isinstance(q.head, DynamicInt8Linear)
    with pytest.raises(UnsupportedModelError, match="no layer"):
        apply_dynamic(nn.Sequential(nn.Conv2d(1, 2, 3)), DynamicQuantization(on_unsupported="warn"))
    with pytest.raises(ConfigError, match="bits"):
        DynamicQuantization(bits=4)
    with pytest.raises(ConfigError, match="layers"):
        DynamicQuantization(layers=("Conv2d",))
    with pytest.raises(ConfigError, match="matches no layer"):
        apply_dynamic(model, DynamicQuantization(exclude=("nope*",)))


# ----------------------------------------------------------------------------------------------
# Weight-only


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_and_group_round_trip_bounds(bits):
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    for symmetric in (True, False):
        u, scale, zero = quantize_groups(w, bits, 32, symmetric)
        assert u.min() >= 0 and u.max() <= 2 ** bits - 1
        assert torch.equal(unpack_bits(pack_bits(u, bits), bits), u)
        assert pack_bits(u, bits).numel() == w.numel() * bits // 8
        z = (2 ** (bits - 1)) if symmetric else zero.float()[..., None]
        deq = ((u.float().reshape(16, 2, 32) - z) * scale.float()[..., None]).reshape(16, 64)
        step = scale.float().repeat_interleave(32, 1)
        assert ((deq - w).abs() <= step / 2 + 1e-6).all()  # round-to-nearest, nothing clipped


def test_weight_only_linear_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(8, 64)
    with pytest.warns(UserWarning, match=r"4 \(Linear: group_size=64 does not divide in_features=32"):
        q = apply_weight_only(model, WeightOnly(bits=4, group_size=64))
    assert isinstance(q[0], WeightOnlyLinear) and isinstance(q[2], WeightOnlyLinear) and type(q[4]) is nn.Linear
    assert q[0].packed.dtype == torch.uint8 and q[0].packed.shape == (128, 32)
    with torch.no_grad():
        out = q(x)
        slow = nn.functional.linear(torch.relu(nn.functional.linear(x, q[0].dequantized_weight(), q[0].bias)),
                                    q[2].dequantized_weight(), q[2].bias)
        assert (torch.relu(slow) @ q[4].weight.T + q[4].bias - out).abs().max() < 0.02  # int4 kernel ~ dequant
        assert (out - model(x)).abs().max() < 0.1
    back = load(save(q, tmp_path / "wo.slim"))
    with torch.no_grad():
        assert torch.equal(back(x), out)
    with pytest.raises(UnsupportedModelError, match="group_size=64 does not divide"):
        apply_weight_only(model, WeightOnly(bits=4, group_size=64, on_unsupported="raise"))
    with pytest.raises(ConfigError, match="bits=1"):
        WeightOnly(bits=1)


# ----------------------------------------------------------------------------------------------
# fp8 (math on CPU; the _scaled_mm path needs an fp8 GPU)


def test_fp8_e4m3_round_trip_error_bound():
    torch.manual_seed(0)
    t = torch.randn(32, 256) * torch.logspace(-3, 3, 32)[:, None]
    q, scale = fp8_quantize(t, dim=-1)
    assert q.dtype == torch.float8_e4m3fn
    assert torch.allclose(q.float().abs().amax(-1), torch.full((32,), E4M3_MAX))  # each row's max maps to 448
    back = fp8_dequantize(q, scale)
    normal = t.abs() >= scale * 2 ** -6  # e4m3 normals: 3 mantissa bits -> relative error <= 2^-4
    assert ((back - t).abs() <= t.abs() * 2 ** -4 + 1e-12)[normal].all()
    assert ((back - t).abs() <= scale * 2 ** -10)[~normal].all()  # subnormal spacing 2^-9, half of it


def test_fp8_linear_emulation_and_errors(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(8, 32)
    if not fp8_supported():
        with pytest.raises(UnsupportedModelError, match="fp8 needs a CUDA GPU"):
            apply_fp8(model, Float8())
    q = apply_fp8(model, Float8(emulate=True))
    assert isinstance(q[0], Fp8Linear) and q[0].weight_bits.dtype == torch.uint8
    with torch.no_grad():
        out = q(x)
        assert (out - model(x)).abs().max() < 0.08 * model(x).abs().max()
    back = load(save(q, tmp_path / "fp8.slim"))
    with torch.no_grad():
        assert torch.equal(back(x), out)
