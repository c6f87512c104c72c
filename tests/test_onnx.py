"""ONNX export of fp32, pruned and int8 models; agreement with ONNX Runtime; bad input."""

import os

import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import torchslim
from torchslim.export.onnx import OnnxExistsError, OnnxExportError, export_onnx, onnx_agreement, ort_session
from torchslim.quantization.backends.dynamic import DynamicInt8RNN
from torchslim.quantization.ptq import StaticQuantization
from torchslim.quantization.static import apply_static


def _no_temp_files(folder) -> bool:
    return not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_fp32_export_matches_pytorch_on_the_test_set(trained_lenet5, digits_data, tmp_path):
    path = export_onnx(trained_lenet5, digits_data.example_inputs(4), tmp_path / "lenet.onnx")
    onnx.checker.check_model(onnx.load(path))
    agreement = onnx_agreement(trained_lenet5, path, digits_data.test)
    assert agreement.samples == len(digits_data.test.dataset)
    assert agreement.top1_agreement >= 0.995
    assert agreement.max_abs_diff <= 1e-4 * max(1.0, agreement.max_logit)
    sess = ort_session(path.read_bytes())
    name = sess.get_inputs()[0].name
    for batch in (1, 7):  # the batch dimension is dynamic
        x = torch.randn(batch, 1, 28, 28)
        assert sess.run(None, {name: x.numpy()})[0].shape == (batch, 10)
    assert _no_temp_files(tmp_path)


def test_masked_pruned_export_keeps_zeros(trained_lenet5, digits_data, tmp_path):
    pruned = torchslim.prune(trained_lenet5, torchslim.UnstructuredPruning(sparsity=0.6))
    path = export_onnx(pruned, digits_data.example_inputs(2), tmp_path / "pruned.onnx")
    agreement = onnx_agreement(pruned, path, digits_data.test)
    assert agreement.top1_agreement >= 0.995 and agreement.max_abs_diff <= 1e-4 * max(1.0, agreement.max_logit)
    weights = [numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer if i.dims and len(i.dims) >= 2]
    total = sum(w.size for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros / total >= 0.55  # masks were folded into the exported weights
    assert hasattr(pruned.conv1, "weight_mask")  # ... of a copy: the pruned model keeps its masks


def test_structurally_pruned_export(trained_lenet5, digits_data, tmp_path):
    x = digits_data.example_inputs(2)
    smaller = torchslim.prune(trained_lenet5, torchslim.StructuredPruning(ratio=0.5), example_inputs=x)
    assert smaller.conv2.out_channels < trained_lenet5.conv2.out_channels
    path = export_onnx(smaller, x, tmp_path / "smaller.onnx")
    agreement = onnx_agreement(smaller, path, digits_data.test, max_batches=1)
    assert agreement.top1_agreement >= 0.995 and agreement.max_abs_diff <= 1e-4 * max(1.0, agreement.max_logit)


def test_int8_export_writes_the_quantized_graph(trained_lenet5, digits_data, tmp_path):
    q = apply_static(trained_lenet5, StaticQuantization(calibration_batches=2, backend="ort_qdq"),
                     calibration_data=digits_data.train)
    path = export_onnx(q, digits_data.example_inputs(2), tmp_path / "int8.onnx")
    graph = onnx.load(path)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 8
    int8 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2]
    assert len(int8) == 4  # conv1, conv2, fc1, fc2 weights stored as int8
    agreement = onnx_agreement(q, path, digits_data.test)
    assert agreement.top1_agreement >= 0.995 and agreement.max_abs_diff <= 1e-5
    vs_float = onnx_agreement(trained_lenet5, path, digits_data.test)
    assert vs_float.top1_agreement >= 0.98  # int8 graph vs the fp32 PyTorch model


def test_refuses_overwrite_and_replaces_atomically(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3)).eval()
    x = torch.randn(2, 4)
    path = export_onnx(model, (x,), tmp_path / "m.onnx")
    first = path.read_bytes()
    with pytest.raises(OnnxExistsError, match="overwrite=True"):
        export_onnx(model, (x,), path)
    assert path.read_bytes() == first
    with torch.no_grad():
        model[0].weight.mul_(2)
    export_onnx(model, x, path, overwrite=True)
    assert path.read_bytes() != first and _no_temp_files(tmp_path)
    with pytest.raises(OnnxExportError, match="directory"):
        export_onnx(model, (x,), tmp_path)


class _Eigh(nn.Module):
    def forward(self, x):
        return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]


class _WithEigh(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.spectrum = _Eigh()

    def forward(self, x):
        return self.spectrum(self.proj(x))


def test_unsupported_op_names_op_and_layer(tmp_path):
    with pytest.raises(OnnxExportError, match=r"eigh.*spectrum"):
        export_onnx(_WithEigh().eval(), (torch.randn(3, 6, 6),), tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()
    rnn = nn.Sequential(DynamicInt8RNN.from_float(nn.LSTM(4, 8)))
    with pytest.raises(OnnxExportError, match=r"layer '0' \(DynamicInt8RNN\)"):
        export_onnx(rnn, (torch.randn(5, 2, 4),), tmp_path / "rnn.onnx")
    with pytest.raises(OnnxExportError, match="example_inputs"):
        export_onnx(nn.Linear(2, 2), (), tmp_path / "empty.onnx")
