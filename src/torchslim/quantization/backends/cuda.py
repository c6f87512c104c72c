"""CUDA low-precision paths: fp8 (e4m3) matmuls through ``torch._scaled_mm``, and per-shape timing that
keeps a layer in bf16 where the low-precision kernel is not faster.

Everything here is guarded by availability: without a CUDA GPU with fp8 tensor cores (compute capability
8.9+), :class:`Fp8Linear` computes the same quantize/dequantize math in float (emulation: exact numerics,
no speed-up) and :func:`fp8_supported` says so. Tested on CPU for the math only; the timings need a GPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import TorchslimError
from ...export.checkpoint import ModuleCodec

__all__ = ["E4M3_MAX", "fp8_supported", "fp8_quantize", "fp8_dequantize", "Fp8Linear", "time_cuda",
           "faster_than_bf16", "CODECS"]

E4M3_MAX = 448.0
_FP8 = getattr(torch, "float8_e4m3fn", None)


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """True when ``torch._scaled_mm`` can run e4m3 matmuls on this CUDA device (compute capability >= 8.9)."""
    if _FP8 is None or not hasattr(torch, "_scaled_mm") or not torch.cuda.is_available():
        return False
    device = torch.device(device or "cuda")
    if device.type != "cuda":
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_quantize(t: torch.Tensor, dim: int | None = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and float32 scales with ``t ~ q * scale``: one scale per row (``dim=-1``: the max over the
    last dimension maps to 448) or per tensor (``dim=None``)."""
    if _FP8 is None:
        raise TorchslimError(f"torch {torch.__version__} has no float8_e4m3fn dtype; upgrade torch for fp8")
    t = t.float()
    amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
    scale = (amax / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (t / scale).clamp(-E4M3_MAX, E4M3_MAX).to(_FP8)
    return q, scale.float()


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


class Fp8Linear(nn.Module):
    """Linear with e4m3 weights (one scale per output row) and e4m3 activations (one scale per row, computed
    per call), run by ``torch._scaled_mm`` (bf16 output) on fp8-capable GPUs, emulated in float elsewhere.

    The weight is stored as its uint8 bit pattern so checkpoints need no fp8 support.
    """

    onnx_unsupported = "fp8 matmuls have no ONNX Runtime CPU kernel; export the float model instead"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_bits", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(out_features, 1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> "Fp8Linear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w8, scale = fp8_quantize(linear.weight.detach(), dim=-1)
        with torch.no_grad():
            q.weight_bits.copy_(w8.cpu().view(torch.uint8))
            q.weight_scale.copy_(scale.cpu())
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def weight_fp8(self) -> torch.Tensor:
        return self.weight_bits.view(_FP8)

    def dequantized_weight(self) -> torch.Tensor:
        return fp8_dequantize(self.weight_fp8(), self.weight_scale)

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether ``forward(x)`` runs ``torch._scaled_mm`` (fp8 GPU, dimensions multiples of 16)."""
        return (fp8_supported(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and not x.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        xq, xs = fp8_quantize(x2, dim=-1)
        if self.uses_kernel(x):
            pad = (-x2.shape[0]) % 16  # _scaled_mm wants M to be a multiple of 16 as well
            if pad:
                xq = torch.cat([xq, torch.zeros(pad, self.in_features, dtype=xq.dtype, device=xq.device)])
                xs = torch.cat([xs, torch.ones(pad, 1, dtype=xs.dtype, device=xs.device)])
            y = torch._scaled_mm(xq, self.weight_fp8().t(), scale_a=xs, scale_b=self.weight_scale.t(),
                                 out_dtype=torch.bfloat16)
            y = y[: x2.shape[0]].to(x.dtype)
            if self.bias is not None:
                y = y + self.bias.to(x.dtype)
        else:
            y = F.linear(fp8_dequantize(xq, xs).to(x.dtype), self.dequantized_weight().to(x.dtype),
                         None if self.bias is None else self.bias.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def time_cuda(fn: Callable[[], object], repeats: int = 20, warmup: int = 5) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA device (synchronised)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


@torch.no_grad()
def faster_than_bf16(linear: nn.Linear, quantized: nn.Module, rows: int) -> tuple[bool, float, float]:
    """Time ``quantized`` against ``linear`` in bf16 on a ``rows`` x in_features input on the layer's GPU;
    returns ``(faster, bf16_ms, quantized_ms)``. (The issue notes that on an H100 plain int8 ``_int_mm`` is
    slower than fp16, so every low-precision layer is measured before it is kept.)"""
    device = linear.weight.device
    if device.type != "cuda":
        raise TorchslimError("faster_than_bf16 measures on a CUDA device; the layer is on " + str(device))
    x = torch.randn(rows, linear.in_features, device=device, dtype=torch.bfloat16)
    w = linear.weight.detach().to(torch.bfloat16)
    b = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
    base = time_cuda(lambda: F.linear(x, w, b))
    low = time_cuda(lambda: quantized(x))
    return low < base, base, low


CODECS = (
    ModuleCodec(Fp8Linear,
                lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
                lambda a: Fp8Linear(**a)),
)
"""Checkpoint codec of :class:`Fp8Linear`."""
