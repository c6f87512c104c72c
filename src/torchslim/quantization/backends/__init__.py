"""Execution backends for quantized models: where the integer arithmetic actually runs.

- :mod:`.onnxrt` -- static int8 graphs (QDQ or QOperator) run by ONNX Runtime's CPU integer kernels;
- :mod:`.torch_int8` -- the same QOperator graphs lowered to PyTorch's quantized kernels (onednn, x86);
- :mod:`.dynamic` -- dynamic int8 Linear / LSTM / GRU on PyTorch's fbgemm/oneDNN kernels or ``torch._int_mm``;
- :mod:`.weight_only` -- int8/int4/int2 grouped weight-only Linear (int4 kernels on CPU and CUDA);
- :mod:`.cpu` -- the CPU's int8 capabilities (VNNI or not) and the settings that stay accurate on it;
- :mod:`.cuda` -- fp8 (e4m3) matmuls through ``torch._scaled_mm`` and per-shape timing against bf16.

:data:`CODECS` holds the checkpoint codecs of every module type they define.
"""

from __future__ import annotations

from . import cpu, cuda, dynamic, onnxrt, weight_only
from .cpu import CpuInt8, cpu_int8
from .cuda import Fp8Linear, fp8_dequantize, fp8_quantize, fp8_supported
from .dynamic import DynamicInt8Linear, DynamicInt8RNN
from .onnxrt import QuantizedGraphModel
from .weight_only import WeightOnlyLinear

STATIC_BACKENDS = ("ort_qdq", "ort_qop", "torch_onednn", "torch_x86")
"""Static int8 backends ``StaticQuantization(backend=...)`` can pick from (``"auto"`` measures them)."""

CODECS = (*cuda.CODECS, *dynamic.CODECS, *onnxrt.CODECS, *weight_only.CODECS)

__all__ = ["STATIC_BACKENDS", "CpuInt8", "cpu_int8", "QuantizedGraphModel", "DynamicInt8Linear", "DynamicInt8RNN", "WeightOnlyLinear",
           "Fp8Linear", "fp8_quantize", "fp8_dequantize", "fp8_supported", "CODECS"]
