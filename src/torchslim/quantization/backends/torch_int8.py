"""PyTorch int8 backend: run a QOperator ONNX graph (QLinearConv, QLinearAdd, QGemm, ...) on PyTorch's
quantized CPU kernels (the ``onednn`` or ``x86`` engine).

The quantized graph written by :func:`~torchslim.quantization.backends.onnxrt.quantize_graph` stays the one
stored representation; this module lowers it to ``torch.ops.quantized`` calls (weights prepacked once),
so a checkpoint re-lowers to whichever backend was measured fastest. PyTorch marks its quantized-tensor
API as deprecated; its warnings are silenced here and a build without those kernels simply makes this
backend unavailable (``auto`` then measures the ONNX Runtime backends only).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...core.errors import UnsupportedModelError

__all__ = ["TorchInt8Program", "ENGINES", "engine_available"]

ENGINES = {"torch_onednn": "onednn", "torch_x86": "x86"}
"""Backend name -> ``torch.backends.quantized.engine``."""

_Step = Callable[[dict[str, Any]], None]


def engine_available(backend: str) -> bool:
    """Whether this PyTorch build has the quantized engine ``backend`` names and the ops it needs."""
    engine = ENGINES.get(backend)
    try:
        ops = torch.ops.quantized
        has_ops = all(hasattr(ops, op) for op in ("conv2d_prepack", "conv2d", "linear_prepack", "linear", "add"))
    except (AttributeError, RuntimeError):
        return False
    return engine is not None and engine in torch.backends.quantized.supported_engines and has_ops


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    """Select a quantized engine for the duration of a call (PyTorch keeps it in a process-wide setting)."""
    old = torch.backends.quantized.engine
    if old != name:
        torch.backends.quantized.engine = name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensors are deprecated in torch 2.x
            yield
    finally:
        if old != name:
            torch.backends.quantized.engine = old


class TorchInt8Program:
    """A QOperator graph compiled to a list of PyTorch quantized-kernel calls for one engine."""

    def __init__(self, model, backend: str = "torch_onednn"):
        from onnx import helper, numpy_helper

        if not engine_available(backend):
            raise UnsupportedModelError(f"PyTorch backend {backend!r} is not available in torch {torch.__version__} "
                                        f"(engines: {torch.backends.quantized.supported_engines})")
        self.backend, self.engine = backend, ENGINES[backend]
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.inputs = [i.name for i in model.graph.input if i.name not in self.inits]
        self.outputs = [o.name for o in model.graph.output]
        self.steps: list[_Step] = []
        with _engine(self.engine):
            for node in model.graph.node:
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                lower = getattr(self, f"_lower_{node.op_type}", None)
                if lower is None:
                    raise UnsupportedModelError(f"node {node.name!r} ({node.op_type}) has no lowering to PyTorch's "
                                                "int8 kernels; use an ONNX Runtime backend for this model")
                self.steps.append(lower(node, attrs))

    def __call__(self, *inputs: torch.Tensor, **named: torch.Tensor):
        values: dict[str, Any] = {**dict(zip(self.inputs, inputs)), **named}
        with _engine(self.engine), torch.no_grad():
            for step in self.steps:
                step(values)
        outs = [values[o] for o in self.outputs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    # -- helpers -----------------------------------------------------------------------------------

    def _scalar(self, name: str) -> float:
        return float(np.asarray(self.inits[name]).reshape(-1)[0])

    def _qweight(self, name: str, scale: str, zero: str) -> torch.Tensor:
        w = torch.from_numpy(np.array(self.inits[name], copy=True))
        s = np.asarray(self.inits[scale], dtype=np.float64).reshape(-1)
        z = np.asarray(self.inits[zero]).reshape(-1).astype(np.int64)
        if w.dtype != torch.int8:
            raise UnsupportedModelError(f"weight {name!r} is {w.dtype}; PyTorch's int8 kernels take int8 weights")
        if s.size == 1:
            return torch._make_per_tensor_quantized_tensor(w, float(s[0]), int(z[0]))
        return torch._make_per_channel_quantized_tensor(w, torch.from_numpy(s), torch.from_numpy(z), 0)

    def _bias(self, node, index: int, in_scale: str, w_scale: str) -> torch.Tensor | None:
        if len(node.input) <= index or not node.input[index]:
            return None
        b = np.asarray(self.inits[node.input[index]], dtype=np.float64)
        s = np.asarray(self.inits[in_scale], dtype=np.float64).reshape(-1)[0] * \
            np.asarray(self.inits[w_scale], dtype=np.float64).reshape(-1)
        return torch.from_numpy((b * s).astype(np.float32))

    @staticmethod
    def _symmetric_pads(node, attrs: dict) -> list[int]:
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise UnsupportedModelError(f"node {node.name!r}: auto_pad={attrs['auto_pad']!r} is not lowered")
        pads = list(attrs.get("pads", [0, 0, 0, 0]))
        half = len(pads) // 2
        if pads[:half] != pads[half:]:
            raise UnsupportedModelError(f"node {node.name!r}: asymmetric pads {pads} have no PyTorch int8 equivalent")
        return pads[:half]

    # -- lowerings (one per op type) ---------------------------------------------------------------

    def _lower_QuantizeLinear(self, node, attrs: dict) -> _Step:
        x, out = node.input[0], node.output[0]
        scale, zero = self._scalar(node.input[1]), int(self._scalar(node.input[2]))
        dtype = torch.quint8 if self.inits[node.input[2]].dtype == np.uint8 else torch.qint8

        def step(v: dict) -> None:
            v[out] = torch.quantize_per_tensor(v[x].float(), scale, zero, dtype)
        return step

    def _lower_DequantizeLinear(self, node, attrs: dict) -> _Step:
        x, out = node.input[0], node.output[0]

        def step(v: dict) -> None:
            v[out] = v[x].dequantize()
        return step

    def _lower_QLinearConv(self, node, attrs: dict) -> _Step:
        if len(attrs.get("kernel_shape", [])) != 2:
            raise UnsupportedModelError(f"node {node.name!r}: only 2-d QLinearConv is lowered to PyTorch")
        i = node.input
        weight = self._qweight(i[3], i[4], i[5])
        bias = self._bias(node, 8, i[1], i[4])
        packed = torch.ops.quantized.conv2d_prepack(weight, bias, list(attrs.get("strides", [1, 1])),
                                                    self._symmetric_pads(node, attrs),
                                                    list(attrs.get("dilations", [1, 1])), int(attrs.get("group", 1)))
        scale, zero, x, out = self._scalar(i[6]), int(self._scalar(i[7])), i[0], node.output[0]

        def step(v: dict) -> None:
            v[out] = torch.ops.quantized.conv2d(v[x], packed, scale, zero)
        return step

    def _lower_QGemm(self, node, attrs: dict) -> _Step:
        i = node.input
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or len(i) < 9 or not i[7]:
            raise UnsupportedModelError(f"node {node.name!r}: only QGemm with transA=0, alpha=1 and a quantized "
                                        "output is lowered to PyTorch")
        weight = self._qweight(i[3], i[4], i[5])
        if not attrs.get("transB", 0):
            weight = weight.t().contiguous() if weight.qscheme() == torch.per_tensor_affine else None
            if weight is None:
                raise UnsupportedModelError(f"node {node.name!r}: per-channel QGemm with transB=0 is not lowered")
        packed = torch.ops.quantized.linear_prepack(weight, self._bias(node, 6, i[1], i[4]))
        scale, zero, x, out = self._scalar(i[7]), int(self._scalar(i[8])), i[0], node.output[0]

        def step(v: dict) -> None:
            v[out] = torch.ops.quantized.linear(v[x], packed, scale, zero)
        return step

    def _lower_QLinearAdd(self, node, attrs: dict) -> _Step:
        i = node.input
        a, b, out = i[0], i[3], node.output[0]
        scale, zero = self._scalar(i[6]), int(self._scalar(i[7]))

        def step(v: dict) -> None:
            v[out] = torch.ops.quantized.add(v[a], v[b], scale, zero)
        return step

    def _lower_QLinearGlobalAveragePool(self, node, attrs: dict) -> _Step:
        if attrs.get("channels_last", 0):
            raise UnsupportedModelError(f"node {node.name!r}: channels_last QLinearGlobalAveragePool is not lowered")
        i = node.input
        x, out = i[0], node.output[0]
        scale, zero = self._scalar(i[3]), int(self._scalar(i[4]))

        def step(v: dict) -> None:
            pooled = F.adaptive_avg_pool2d(v[x], 1)  # keeps the input's qparams: requantize to the output's
            v[out] = torch.quantize_per_tensor(pooled.dequantize(), scale, zero, pooled.dtype)
        return step

    def _lower_MaxPool(self, node, attrs: dict) -> _Step:
        if attrs.get("storage_order", 0) or len(attrs.get("kernel_shape", [])) != 2 or len(node.output) > 1:
            raise UnsupportedModelError(f"node {node.name!r}: this MaxPool form is not lowered to PyTorch")
        x, out = node.input[0], node.output[0]
        kernel, strides = list(attrs["kernel_shape"]), list(attrs.get("strides", attrs["kernel_shape"]))
        pads, dilations = self._symmetric_pads(node, attrs), list(attrs.get("dilations", [1, 1]))
        ceil = bool(attrs.get("ceil_mode", 0))

        def step(v: dict) -> None:
            v[out] = F.max_pool2d(v[x], kernel, strides, pads, dilations, ceil_mode=ceil)
        return step

    def _lower_Reshape(self, node, attrs: dict) -> _Step:
        if node.input[1] not in self.inits:
            raise UnsupportedModelError(f"node {node.name!r}: Reshape with a computed shape is not lowered")
        shape = [int(s) for s in np.asarray(self.inits[node.input[1]]).reshape(-1)]
        allow_zero = bool(attrs.get("allowzero", 0))
        x, out = node.input[0], node.output[0]

        def step(v: dict) -> None:
            t = v[x]
            target = shape if allow_zero else [t.shape[k] if s == 0 else s for k, s in enumerate(shape)]
            v[out] = t.reshape(target)
        return step

    def _lower_Flatten(self, node, attrs: dict) -> _Step:
        axis = int(attrs.get("axis", 1))
        x, out = node.input[0], node.output[0]

        def step(v: dict) -> None:
            t = v[x]
            lead = int(np.prod(t.shape[:axis])) if axis else 1
            v[out] = t.reshape(lead, -1)
        return step
