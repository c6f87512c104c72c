"""Weight-only low-bit Linear: 2- to 8-bit codes in groups along the input dimension, packed into bytes.

Storage is portable (``packed``: uint8, each row one bit stream of ``bits``-bit codes, e.g. 2 codes per byte
for int4, 4 for int2, 8 per 3 bytes for int3; ``scale`` and, when asymmetric, ``zero`` per group). Kernels are
chosen per device and call:

- CPU, 4 bits: PyTorch's ``_weight_int4pack_mm_for_cpu`` (bf16 activations, fp32 accumulation) when
  this build has it, packed lazily from the portable codes;
- CUDA, 4 bits: ``_weight_int4pack_mm`` (tinygemm layout, bf16); CUDA, 8 bits: ``_weight_int8pack_mm``;
- otherwise (and for 2, 3, 5, 6, 7 bits): dequantize the weight and use a float matmul.

A kernel that fails for a shape is disabled for that layer (with a warning) and the dequantize path is used.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import ConfigError, TorchslimError
from ...export.checkpoint import ModuleCodec
from ...nn.bitpack import pack_bits, unpack_bits

__all__ = ["WeightOnlyLinear", "quantize_groups", "WEIGHT_ONLY_BITS", "CODECS"]

WEIGHT_ONLY_BITS = (2, 3, 4, 5, 6, 7, 8)
_INT4_GROUPS = (32, 64, 128, 256)  # group sizes PyTorch's int4 kernels accept
_MIN_SCALE = 2.0 ** -24


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Unsigned codes, fp16 scales and (asymmetric) uint8 zero points of ``w`` ([out, in]) per group.

    Symmetric: ``w ~ (u - 2^(b-1)) * s`` with codes in [1, 2^b - 1] (narrow range, exactly symmetric).
    Asymmetric: ``w ~ (u - z) * s`` with codes in [0, 2^b - 1]. Scales are rounded to fp16 before the codes
    are computed, so the stored (fp16) scale reproduces them exactly.
    """
    out_f, in_f = w.shape
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)
    levels = 2 ** bits - 1
    if symmetric:
        half = 2 ** (bits - 1)
        scale = (g.abs().amax(-1) / (half - 1)).clamp_min(_MIN_SCALE).half().float().clamp_min(_MIN_SCALE)
        u = torch.clamp(torch.round(g / scale[..., None]) + half, 1, levels)
        zero = None
    else:
        lo = g.amin(-1).clamp(max=0)
        hi = g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / levels).clamp_min(_MIN_SCALE).half().float().clamp_min(_MIN_SCALE)
        zero = torch.clamp(torch.round(-lo / scale), 0, levels)
        u = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, levels)
        zero = zero.to(torch.uint8)
    return u.reshape(out_f, in_f).to(torch.uint8), scale.half(), zero


class WeightOnlyLinear(nn.Module):
    """A Linear layer whose weight is stored as ``bits``-bit codes in groups of ``group_size`` inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 group_size: int = 32, symmetric: bool = True):
        super().__init__()
        if bits not in WEIGHT_ONLY_BITS:
            raise ConfigError(f"weight-only bits must be one of {list(WEIGHT_ONLY_BITS)}, got {bits}")
        if in_features % group_size:
            raise ConfigError(f"group_size={group_size} must divide in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, (in_features * bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.float16))
        if not symmetric:
            self.register_buffer("zero", torch.zeros(out_features, groups, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernel_state: dict = {}
        self.kernel_error: str | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, bits: int = 4, group_size: int = 32,
                   symmetric: bool = True) -> "WeightOnlyLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits, group_size=group_size,
                symmetric=symmetric)
        u, scale, zero = quantize_groups(linear.weight, bits, group_size, symmetric)
        with torch.no_grad():
            q.packed.copy_(pack_bits(u, bits))
            q.scale.copy_(scale)
            if zero is not None:
                q.zero.copy_(zero)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def codes(self) -> torch.Tensor:
        """Unsigned integer codes [out, in]."""
        return unpack_bits(self.packed, self.bits, self.in_features)

    def _zero(self) -> torch.Tensor:
        if self.symmetric:
            return torch.full_like(self.scale, 2 ** (self.bits - 1), dtype=torch.float32)
        return self.zero.float()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        u = self.codes().float().reshape(self.out_features, -1, self.group_size)
        w = (u - self._zero()[..., None]) * self.scale.float()[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise TorchslimError(f"WeightOnlyLinear expects {self.in_features} input features, got {x.shape[-1]}")
        if not (torch.compiler.is_compiling() or x.requires_grad):
            y = self._kernel_forward(x)
            if y is not None:
                return y
        return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    # -- integer kernels ---------------------------------------------------------------------------

    def _kernel_name(self, device: torch.device) -> str | None:
        if self.kernel_error is not None:
            return None
        if device.type == "cpu" and self.bits == 4 and self.group_size in _INT4_GROUPS \
                and self.out_features % 16 == 0 and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
            return "int4_cpu"
        if device.type == "cuda" and self.bits == 4 and self.group_size in _INT4_GROUPS \
                and hasattr(torch, "_weight_int4pack_mm"):
            return "int4_cuda"
        if device.type == "cuda" and self.bits == 8 and hasattr(torch, "_weight_int8pack_mm"):
            return "int8_cuda"
        return None

    def _kernel_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        name = self._kernel_name(x.device)
        if name is None:
            return None
        try:
            state = self._kernel_state.get(name) or self._pack_for(name, x.device)
            self._kernel_state[name] = state
            x2 = x.reshape(-1, self.in_features)
            if name == "int8_cuda":
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), state["w"], state["s"])
            elif name == "int4_cpu":
                y = torch._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), state["w"],
                                                      self.group_size, state["sz"])
            else:
                y = torch._weight_int4pack_mm(x2.to(torch.bfloat16).contiguous(), state["w"], self.group_size,
                                              state["sz"])
        except (RuntimeError, TypeError, NotImplementedError) as exc:
            self.kernel_error = f"{name}: {' '.join(str(exc).split())[:200]}"
            warnings.warn(f"WeightOnlyLinear({self.in_features}->{self.out_features}): integer kernel {name} failed "
                          f"({self.kernel_error}); using the dequantize path for this layer", RuntimeWarning,
                          stacklevel=3)
            return None
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _pack_for(self, name: str, device: torch.device) -> dict:
        if name == "int8_cuda":
            if self.group_size != self.in_features or not self.symmetric:
                raise RuntimeError("the int8 weight-only kernel takes one scale per output channel (group_size = "
                                   "in_features) and symmetric codes")
            w = (self.codes().to(torch.int16) - 128).to(torch.int8)
            return {"w": w.to(device).contiguous(), "s": self.scale[:, 0].to(device, torch.bfloat16)}
        # tinygemm layout: w = (u - 8) * scale + zero_float, with scales_and_zeros [groups, out, 2]
        u = self.codes()
        scale = self.scale.float()
        zero_float = (8.0 - self._zero()) * scale
        sz = torch.stack([scale.t(), zero_float.t()], -1).contiguous().to(device, torch.bfloat16)
        if name == "int4_cpu":
            w = torch._convert_weight_to_int4pack_for_cpu(u.to(torch.int32).to(device), 8)
        else:
            packed = ((u[:, ::2] << 4) | u[:, 1::2]).to(torch.uint8).to(device)
            w = torch._convert_weight_to_int4pack(packed.contiguous(), 8)
        return {"w": w, "sz": sz}

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_state = {}
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._kernel_state = {}
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_kernel_state"] = {}
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}")


CODECS = (
    ModuleCodec(WeightOnlyLinear,
                lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                           "bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric},
                lambda a: WeightOnlyLinear(**a)),
)
"""Checkpoint codec of :class:`WeightOnlyLinear`."""
