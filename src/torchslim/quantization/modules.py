"""Quantized layers: the fake-quant training wrappers and the converted integer-code modules.

- ``QuantLinear`` / ``QuantConv1d`` / ``QuantConv2d`` (QAT): subclasses of the float layers whose forward
  passes the weight through ``weight_quant`` and the input through ``input_quant`` (a fake quantizer from
  :mod:`.fake`, or None). ``weight`` stays a float Parameter, so ``torch.nn.utils.prune`` masks,
  optimizers and distillation work on them unchanged.
- ``QLinear`` / ``QConv1d`` / ``QConv2d`` (converted): the weight is held as integer codes (an int8 buffer
  ``weight_codes``, int16 above 8 bits) with ``weight_scale`` / ``weight_zero`` per tensor, channel or group,
  dequantized on the fly in ``forward`` -- the portable execution path. Binary and ternary layers hold codes
  in {-1, 0, 1} with a per-channel scale. When the input was quantized during training, the input's scale,
  zero point and code range are kept and applied too, so the converted model computes exactly what the
  trained one did.

Their checkpoint codecs are in :mod:`.codecs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..core.errors import TorchslimError
from ..nn.inference import float_layer
from ..nn.masks import effective, masked_names
from ..nn.modules import decoded_once
from .fake import FakeQuantize, Quantizer

__all__ = [
    "QuantLinear", "QuantConv1d", "QuantConv2d", "QLinear", "QConv1d", "QConv2d",
    "FLOAT_TO_QAT", "QAT_MODULES", "CONVERTED_MODULES", "to_qat_module", "to_converted_module",
]


# ----------------------------------------------------------------------------------------------
# Fake-quant training wrappers


class _QuantMixin:
    """Shared by the QAT wrappers: a weight quantizer and an optional input quantizer."""

    weight_quant: nn.Module
    input_quant: nn.Module | None

    def _init_quant(self) -> None:
        self.add_module("weight_quant", nn.Identity())
        self.add_module("input_quant", None)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.input_quant is not None else x


class QuantLinear(_QuantMixin, nn.Linear):
    """``nn.Linear`` computing with fake-quantized weights (and inputs) during QAT."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.weight_quant(self.weight), self.bias)


class QuantConv1d(_QuantMixin, nn.Conv1d):
    """``nn.Conv1d`` computing with fake-quantized weights (and inputs) during QAT."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.weight_quant(self.weight), self.bias)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """``nn.Conv2d`` computing with fake-quantized weights (and inputs) during QAT."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._init_quant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.weight_quant(self.weight), self.bias)


FLOAT_TO_QAT: dict[type, type] = {nn.Linear: QuantLinear, nn.Conv1d: QuantConv1d, nn.Conv2d: QuantConv2d}
QAT_MODULES = (QuantLinear, QuantConv1d, QuantConv2d)
_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")


def to_qat_module(module: nn.Module, weight_quant: Quantizer, input_quant: Quantizer | None) -> nn.Module:
    """The QAT wrapper of a float ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d``, sharing its parameters.

    ``torch.nn.utils.prune`` masks move along (re-attached with ``custom_from_mask``), so pruned weights
    stay exactly zero through QAT.
    """
    cls = FLOAT_TO_QAT.get(type(module))
    if cls is None:
        raise TorchslimError(f"no QAT wrapper for {type(module).__name__}; supported: "
                             f"{[c.__name__ for c in FLOAT_TO_QAT]}")
    pruned = {name: getattr(module, f"{name}_mask") for name in masked_names(module)}
    params = {name: getattr(module, f"{name}_orig") if name in pruned else getattr(module, name)
              for name in ("weight", "bias")}
    with torch.device("meta"):  # the real tensors are moved in below; skip a throw-away initialisation
        if cls is QuantLinear:
            new = cls(module.in_features, module.out_features, module.bias is not None)
        else:
            new = cls(**{a: getattr(module, a) for a in _CONV_ATTRS}, bias=module.bias is not None)
    new.weight = params["weight"]
    new.bias = params["bias"]
    for name, mask in pruned.items():
        torch_prune.custom_from_mask(new, name, mask)
    new.weight_quant = weight_quant.to(params["weight"].device)
    new.input_quant = input_quant.to(params["weight"].device) if input_quant is not None else None
    return new.train(module.training)


# ----------------------------------------------------------------------------------------------
# Converted modules: integer codes, dequantized on the fly


def _code_dtype(qmin: int, qmax: int) -> torch.dtype:
    for dtype in (torch.int8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= qmin and qmax <= info.max:
            return dtype
    raise TorchslimError(f"integer codes in [{qmin}, {qmax}] do not fit 32 bits")


class _QWeight(nn.Module):
    """Integer weight codes with their scales, plus the input's quantization (if any)."""

    def _init_codes(self, weight_shape: tuple[int, ...], bits: int, scale_shape: tuple[int, ...],
                    group_size: int | None, code_dtype: str, input_range: tuple[int, int] | None,
                    bias: bool, out: int) -> None:
        self.bits = bits
        self.group_size = group_size
        self.input_range = tuple(input_range) if input_range is not None else None
        self.register_buffer("weight_codes", torch.zeros(weight_shape, dtype=getattr(torch, code_dtype)))
        self.register_buffer("weight_scale", torch.ones(scale_shape))
        self.register_buffer("weight_zero", torch.zeros(scale_shape, dtype=torch.int32))
        if input_range is not None:
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero", torch.zeros((), dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight ``(codes - zero) * scale`` (decoded once while running inference)."""
        q, z, s = self.weight_codes, self.weight_zero, self.weight_scale

        def decode() -> torch.Tensor:
            if self.group_size:
                g = q.reshape(*q.shape[:-1], q.shape[-1] // self.group_size, self.group_size)
                return ((g.to(s.dtype) - z) * s).reshape(q.shape)
            return (q.to(s.dtype) - z) * s

        return decoded_once(self, decode, q, z, s)

    inference_packed = True  # int8 and lower codes take a quarter of the float weight's memory or less

    def inference_module(self) -> nn.Module | None:
        """The float layer computing exactly what this one does, or None when the input is quantized too
        (:func:`torchslim.nn.inference.for_inference`)."""
        if self.input_range is not None:
            return None
        return float_layer(self, self.dequantized_weight().detach(), self.bias)

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_range is None:
            return x
        return FakeQuantize.apply(x, self.input_scale.to(x.dtype), self.input_zero, *self.input_range)

    def _codes_args(self) -> dict[str, Any]:
        return {"bits": self.bits, "scale_shape": list(self.weight_scale.shape), "group_size": self.group_size,
                "code_dtype": str(self.weight_codes.dtype).removeprefix("torch."),
                "input_range": list(self.input_range) if self.input_range is not None else None}



class QLinear(_QWeight):
    """Linear layer with integer weight codes, dequantized on the fly."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 scale_shape: tuple[int, ...] = (), group_size: int | None = None, code_dtype: str = "int8",
                 input_range: tuple[int, int] | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_codes((out_features, in_features), bits, tuple(scale_shape) or (out_features, 1), group_size,
                         code_dtype, input_range, bias, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}" + (
            f", input_range={self.input_range}" if self.input_range is not None else "")


class _QConvNd(_QWeight):
    dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, *, bits: int = 8, scale_shape: tuple[int, ...] = (),
                 group_size: int | None = None, code_dtype: str = "int8",
                 input_range: tuple[int, int] | None = None):
        super().__init__()
        n = self.dims

        def tup(v):
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n

        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = tup(kernel_size), tup(stride), tup(dilation)
        self.padding = padding if isinstance(padding, str) else tup(padding)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._init_codes(shape, bits, tuple(scale_shape) or (out_channels,) + (1,) * n, group_size, code_dtype,
                         input_range, bias, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        return conv(self._quant_input(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                    self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bits={self.bits}"
                + (f", input_range={self.input_range}" if self.input_range is not None else ""))


class QConv1d(_QConvNd):
    """1-D convolution with integer weight codes, dequantized on the fly."""

    dims = 1


class QConv2d(_QConvNd):
    """2-D convolution with integer weight codes, dequantized on the fly."""

    dims = 2


CONVERTED_MODULES = (QLinear, QConv1d, QConv2d)
_QAT_TO_CONVERTED: dict[type, type] = {QuantLinear: QLinear, QuantConv1d: QConv1d, QuantConv2d: QConv2d}


def _block_shaped(t: torch.Tensor, weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    if group_size or t.dim() == weight.dim():
        return t
    if t.numel() == 1:
        return t.reshape([1] * weight.dim())
    return t.reshape([-1] + [1] * (weight.dim() - 1))


@torch.no_grad()
def to_converted_module(module: nn.Module, where: str = "") -> nn.Module:
    """The integer-code module (``QLinear``/``QConv1d``/``QConv2d``) equivalent to a trained QAT wrapper."""
    cls = _QAT_TO_CONVERTED.get(type(module))
    if cls is None:
        raise TorchslimError(f"{where or type(module).__name__}: not a QAT wrapper; supported: "
                             f"{[c.__name__ for c in _QAT_TO_CONVERTED]}")
    wq = module.weight_quant
    if not isinstance(wq, Quantizer):
        raise TorchslimError(f"{where}: its weight quantizer is {type(wq).__name__}, not a torchslim quantizer")
    w = effective(module).detach()
    if not torch.isfinite(w).all():
        raise TorchslimError(f"{where}: the weight contains NaN/inf values (training diverged?); cannot convert")
    codes = wq.codes(w)
    scale, zero = wq.qparams(w)
    qmin, qmax = wq.code_range()
    group = wq.spec.group_size if getattr(getattr(wq, "spec", None), "granularity", "") == "group" else None
    scale = _block_shaped(scale.float(), w, group)
    zero = _block_shaped(zero, w, group)
    input_range = None
    if module.input_quant is not None:
        in_scale, in_zero = module.input_quant.qparams()
        input_range = module.input_quant.code_range()
    kwargs = dict(bits=wq.bits, scale_shape=tuple(scale.shape), group_size=group,
                  code_dtype=str(_code_dtype(qmin, qmax)).removeprefix("torch."), input_range=input_range)
    has_bias = module.bias is not None
    with torch.device("meta"):
        if cls is QLinear:
            new = QLinear(module.in_features, module.out_features, has_bias, **kwargs)
        else:
            new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                      module.dilation, module.groups, has_bias, **kwargs)
    device = w.device
    new.to_empty(device=device)
    new.weight_codes.copy_(codes.to(new.weight_codes.dtype))
    new.weight_scale.copy_(scale)
    new.weight_zero.copy_(zero.to(torch.int32))
    if input_range is not None:
        new.input_scale.copy_(in_scale.float().reshape(()))
        new.input_zero.copy_(in_zero.to(torch.int32).reshape(()))
    if has_bias:
        new.bias.copy_(effective(module, "bias").detach())
    return new.train(False)
