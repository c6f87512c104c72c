"""How a tensor is quantized: bit width, symmetric or affine, granularity, signedness."""

from __future__ import annotations

import dataclasses

import torch

from ..core.config import Config
from ..core.checks import check_choice, check_positive
from ..core.errors import ConfigError

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


@dataclasses.dataclass(frozen=True)
class QuantSpec(Config):
    """Uniform quantization of a tensor to ``bits`` bits.

    ``symmetric``: zero point 0, range [-max|x|, max|x|]; otherwise affine (min/max with a zero point).
    ``granularity``: one scale per ``tensor``, per ``channel`` (along ``axis``), or per ``group`` of
    ``group_size`` consecutive elements along the last dimension (weight-only low-bit).
    ``signed``: integer codes in [-2^(b-1), 2^(b-1)-1] (narrowed to a symmetric range when ``symmetric``),
    else [0, 2^b - 1].
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    axis: int = 0
    group_size: int = 128
    signed: bool = True

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; choose one of {list(SUPPORTED_BITS)}")
        check_choice("granularity", self.granularity, ("tensor", "channel", "group"))
        check_positive("group_size", self.group_size, integer=True)

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        if self.bits == 1:
            return -1
        # Narrow range (-127..127 for 8 bits) keeps symmetric quantization exactly symmetric.
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        if self.bits == 1:
            return 1 if self.signed else 1
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    def reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """Dimensions reduced over to get one (min, max) per quantization block."""
        if self.granularity == "channel":
            axis = self.axis % x.dim()
            return tuple(d for d in range(x.dim()) if d != axis)
        return tuple(range(x.dim()))

    def qparams(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and integer zero point mapping [lo, hi] (0 always representable) onto [qmin, qmax]."""
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        eps = torch.finfo(torch.float32).eps
        if self.symmetric:
            bound = torch.maximum(-lo, hi)
            if self.signed:
                scale = bound / max(self.qmax, 1)
            else:
                scale = hi / self.qmax
            scale = scale.clamp_min(eps)
            return scale, torch.zeros_like(scale, dtype=torch.int64)
        scale = ((hi - lo) / (self.qmax - self.qmin)).clamp_min(eps)
        zero = (self.qmin - torch.round(lo / scale)).clamp(self.qmin, self.qmax).to(torch.int64)
        return scale, zero

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.group_size:
            raise ConfigError(f"group_size={self.group_size} does not divide the last dimension {x.shape[-1]}")
        return x.reshape(*x.shape[:-1], x.shape[-1] // self.group_size, self.group_size)

    def minmax(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block (min, max), shaped to broadcast against ``x`` (or its grouped view)."""
        if self.granularity == "group":
            g = self._grouped(x)
            return g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        dims = self.reduce_dims(x)
        return x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)

    def quantize(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of ``x``; ``scale``/``zero`` broadcast as returned by ``qparams``."""
        g = self._grouped(x) if self.granularity == "group" else x
        q = torch.clamp(torch.round(g / scale) + zero, self.qmin, self.qmax)
        return q.reshape(x.shape).to(torch.int64)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        g = self._grouped(q) if self.granularity == "group" else q
        return ((g - zero).to(scale.dtype) * scale).reshape(q.shape)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``x`` with min/max ranges (no gradient trick; see quantization.fake)."""
        scale, zero = self.qparams(*self.minmax(x.detach()))
        return self.dequantize(self.quantize(x, scale, zero), scale, zero)
