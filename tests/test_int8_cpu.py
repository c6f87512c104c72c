"""Static int8 on x86 CPUs without VNNI: the capability override, reduce_range, and an emulation of the AVX2
uint8 x int8 kernel (``vpmaddubsw``: neighbouring products summed in saturating int16) to measure what
saturation costs on any machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torchslim.core.errors import ConfigError
from torchslim.metrics import evaluate
from torchslim.quantization.backends.cpu import ENV, cpu_int8
from torchslim.quantization.backends.onnxrt import QuantizedGraphModel
from torchslim.quantization.backends.torch_int8 import TorchInt8Program, engine_available
from torchslim.quantization.ptq import StaticQuantization
from torchslim.quantization.static import apply_static


def _pairwise_int16(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sum_k a[n, k, l] * w[o, k] as AVX2 computes it: products of k = 2j and 2j + 1 added and clamped to int16,
    then those sums added in int32. ``a``: (n, K, L) uint8 values, ``w``: (O, K) int8 values -> (n, O, L)."""
    if a.shape[1] % 2:
        a, w = F.pad(a, (0, 0, 0, 1)), F.pad(w, (0, 1))
    a, w = a.double(), w.double()
    even = torch.einsum("nkl,ok->nokl", a[:, 0::2], w[:, 0::2])
    odd = torch.einsum("nkl,ok->nokl", a[:, 1::2], w[:, 1::2])
    return (even + odd).clamp(-32768, 32767).sum(2)


class Avx2Emulation(TorchInt8Program):
    """A QOperator graph run with the AVX2 kernel's int16 saturation emulated in QLinearConv and QGemm."""

    def __init__(self, model):
        super().__init__(model, "torch_onednn")

    def _int8_step(self, node, w_index: int, bias_index: int, out_scale: int, to_columns):
        i = node.input
        w = torch.from_numpy(np.array(self.inits[i[w_index]], dtype=np.int64))
        w = w.reshape(w.shape[0], -1)
        w_scale = np.asarray(self.inits[i[w_index + 1]], dtype=np.float64).reshape(-1)
        has_bias = len(i) > bias_index and i[bias_index]
        bias = np.asarray(self.inits[i[bias_index]], dtype=np.float64) if has_bias else np.zeros(w.shape[0])
        x_scale, x_zero = self._scalar(i[1]), int(self._scalar(i[2]))
        y_scale, y_zero = self._scalar(i[out_scale]), int(self._scalar(i[out_scale + 1]))
        mult = torch.from_numpy(x_scale * np.broadcast_to(w_scale, (w.shape[0],)) / y_scale).view(1, -1, 1)
        bias = torch.from_numpy(bias).view(1, -1, 1)
        x, out = i[0], node.output[0]

        def step(v: dict) -> None:
            q = v[x]
            cols, shape = to_columns(q.int_repr().long(), x_zero)
            acc = _pairwise_int16(cols, w) - x_zero * w.sum(1).double().view(1, -1, 1)
            y = torch.round((acc + bias) * mult) + y_zero
            y = y.clamp(0, 255).to(torch.uint8).reshape(shape)
            v[out] = torch._make_per_tensor_quantized_tensor(y, y_scale, y_zero)
        return step

    def _lower_QLinearConv(self, node, attrs: dict):
        kernel = list(attrs["kernel_shape"])
        pads, strides = self._symmetric_pads(node, attrs), list(attrs.get("strides", [1, 1]))
        out_ch = self.inits[node.input[3]].shape[0]

        def to_columns(u8, zero):
            padded = F.pad(u8, (pads[1], pads[1], pads[0], pads[0]), value=zero)  # padding is the value zero
            h = (padded.shape[2] - kernel[0]) // strides[0] + 1
            w = (padded.shape[3] - kernel[1]) // strides[1] + 1
            return F.unfold(padded.double(), kernel, stride=strides).long(), (u8.shape[0], out_ch, h, w)
        return self._int8_step(node, 3, 8, 6, to_columns)

    def _lower_QGemm(self, node, attrs: dict):
        assert attrs.get("transB", 0) == 1 and not attrs.get("transA", 0)
        out_features = self.inits[node.input[3]].shape[0]
        return self._int8_step(node, 3, 6, 7, lambda u8, zero: (u8.unsqueeze(2), (u8.shape[0], out_features)))


def _emulated_accuracy(model: QuantizedGraphModel, loader) -> float:
    program = Avx2Emulation(model.to_onnx())
    correct = total = 0
    for x, y in loader:
        for part, labels in zip(x.split(64), y.split(64)):
            correct += int((program(part).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def test_cpu_int8_detection_and_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    found = cpu_int8()
    assert found.arch in ("x86", "arm", "other") and found.source in ("/proc/cpuinfo", "torch.backends.cpu")
    assert found.saturates == (found.arch == "x86" and not found.vnni)
    monkeypatch.setenv(ENV, "avx2")
    avx2 = cpu_int8()
    assert avx2.saturates and not avx2.vnni and avx2.source == ENV and "no VNNI" in avx2.describe()
    assert not cpu_int8("vnni").saturates and cpu_int8("vnni").source == "argument"
    monkeypatch.setenv(ENV, "avx512")
    with pytest.raises(ConfigError, match=f"{ENV}='avx512'.*avx2"):
        cpu_int8()
    with pytest.raises(ConfigError, match="reduce_range"):
        StaticQuantization(reduce_range="yes")


def _weight_codes(model: QuantizedGraphModel) -> list[torch.Tensor]:
    return [t for k, t in model.tensors.items() if k.endswith("weight_quantized")]


@pytest.fixture(scope="module")
def calibration(digits_data):
    return [b for b, _ in zip((b[0] for b in digits_data.train), range(4))]


def test_static_int8_without_vnni_uses_reduce_range_and_keeps_accuracy(monkeypatch, trained_lenet5, digits_data,
                                                                        calibration):
    monkeypatch.setenv(ENV, "avx2")
    fp32 = evaluate(trained_lenet5, digits_data.test)
    q = apply_static(trained_lenet5, StaticQuantization(backend="ort_qop"), calibration_data=calibration)
    assert q.info["reduce_range"]["on"] and "saturating" in q.info["reduce_range"]["why"]
    assert "7-bit" in q.info["weights"] and "no VNNI" in q.info["cpu_int8"]
    # |w| <= 64: a pair of products is at most 2 * 255 * 64 = 32640, inside int16
    assert max(int(c.abs().max()) for c in _weight_codes(q)) == 64
    emulated = _emulated_accuracy(q, digits_data.test)
    assert evaluate(q, digits_data.test) >= fp32 - 0.015  # the tolerance the VNNI tests use
    assert emulated >= fp32 - 0.015
    x = digits_data.example_inputs(64)[0]
    step = float(next(v for k, v in q.tensors.items() if k.endswith("linear_1_scale")))
    assert (Avx2Emulation(q.to_onnx())(x).dequantize() - q(x)).abs().max() <= step + 1e-6  # the emulation is exact
    full = apply_static(trained_lenet5, StaticQuantization(backend="ort_qop", reduce_range=False),
                        calibration_data=calibration)
    assert not full.info["reduce_range"]["on"] and full.info["reduce_range"]["why"] == "set in the config"
    assert _emulated_accuracy(full, digits_data.test) < emulated  # 8-bit weights saturate on AVX2 (0.936 vs 0.961)
    with pytest.warns(UserWarning, match="8-bit weights.*saturating int16.*reduce_range"):
        QuantizedGraphModel.from_onnx(full.to_onnx(), backend="ort_qop")(x)  # e.g. quantized on a VNNI machine


def test_static_int8_with_vnni_keeps_full_range_weights(monkeypatch, trained_lenet5, calibration):
    monkeypatch.setenv(ENV, "vnni")
    q = apply_static(trained_lenet5, StaticQuantization(backend="ort_qdq"), calibration_data=calibration)
    assert not q.info["reduce_range"]["on"] and q.info["weights"] == "int8 symmetric"
    assert max(int(c.abs().max()) for c in _weight_codes(q)) == 127


def test_static_int8_drift_warns_naming_the_output(monkeypatch, trained_lenet5, calibration):
    from torchslim.quantization import static

    monkeypatch.setitem(static.AGREEMENT_TOLERANCE, "relative_error", 1e-9)
    with pytest.warns(UserWarning, match=r"drifts from the float one.*output '\w+'.*max error"):
        apply_static(trained_lenet5, StaticQuantization(backend="ort_qdq", calibration_batches=1),
                     calibration_data=calibration)
