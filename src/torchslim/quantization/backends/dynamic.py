"""Dynamic int8 modules: int8 weights stored as plain tensors, activations quantized on the fly.

The weights live in ordinary int8/float buffers (so checkpoints hold them as tensors); the int8 kernels
(PyTorch's fbgemm/oneDNN ``quantized::linear_dynamic`` and the dynamic quantized LSTM/GRU cells, or
``torch._int_mm``) are packed lazily from them on first use and never saved.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.errors import TorchslimError, UnsupportedModelError
from ...export.checkpoint import ModuleCodec

__all__ = ["DynamicInt8Linear", "DynamicInt8RNN", "quantize_weight_per_channel", "LINEAR_KERNELS",
           "default_linear_kernel", "CODECS"]

LINEAR_KERNELS = ("fbgemm", "int_mm")


def quantize_weight_per_channel(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes in [-127, 127] and float32 scales (one per output row, or one in total)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=False) if per_channel else w.abs().amax().expand(
        w.shape[0])
    scale = (amax / 127.0).clamp_min(torch.finfo(torch.float32).eps)
    view = scale.reshape(-1, *([1] * (w.dim() - 1)))
    codes = torch.clamp(torch.round(w / view), -127, 127).to(torch.int8)
    return codes, scale.contiguous()


def _ao_available() -> bool:
    try:
        return hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack")
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without quantized ops
        return False


def default_linear_kernel() -> str:
    """``fbgemm`` when PyTorch's quantized CPU ops exist, else ``int_mm`` (float emulation without ``_int_mm``)."""
    if _ao_available():
        return "fbgemm"
    return "int_mm"


def _per_channel_qtensor(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized-tensor creation warns that it is deprecated
        return torch._make_per_channel_quantized_tensor(codes, scale.double(),
                                                        torch.zeros(scale.numel(), dtype=torch.int64), 0)


class DynamicInt8Linear(nn.Module):
    """``y = x W^T + b`` with int8 ``W`` (per-channel scales) and ``x`` quantized to 8 bits per call.

    ``kernel``: ``fbgemm`` (PyTorch's ``quantized::linear_dynamic``: per-tensor uint8 activations,
    ``reduce_range`` as PyTorch's x86 default) or ``int_mm`` (per-row int8 activations, ``torch._int_mm``).
    Off CPU, while exporting or tracing gradients, the same math runs in float ops (``reference``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, kernel: str | None = None):
        super().__init__()
        kernel = kernel or default_linear_kernel()
        if kernel not in LINEAR_KERNELS:
            raise TorchslimError(f"DynamicInt8Linear kernel must be one of {list(LINEAR_KERNELS)}, got {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._packed = None

    @classmethod
    def from_float(cls, linear: nn.Linear, per_channel: bool = True, kernel: str | None = None) -> "DynamicInt8Linear":
        """Quantize ``linear``'s weight (a masked weight counts as its effective value)."""
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, kernel)
        codes, scale = quantize_weight_per_channel(linear.weight, per_channel)
        with torch.no_grad():
            q.weight_int8.copy_(codes)
            q.weight_scale.copy_(scale)
            if linear.bias is not None:
                q.bias.copy_(linear.bias.detach())
        return q.to(linear.weight.device)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise TorchslimError(f"DynamicInt8Linear expects {self.in_features} input features, got {x.shape[-1]}")
        kernel = self.kernel
        if x.device.type != "cpu" or torch.compiler.is_compiling() or x.requires_grad or \
                (kernel == "int_mm" and not hasattr(torch, "_int_mm")):
            kernel = "reference"
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if kernel == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._get_packed(), True)
        elif kernel == "int_mm":
            sx = (x2.abs().amax(1, keepdim=True) / 127.0).clamp_min(torch.finfo(torch.float32).eps)
            xq = torch.clamp(torch.round(x2 / sx), -127, 127).to(torch.int8)
            y = torch._int_mm(xq, self.weight_int8.t()).float() * (sx * self.weight_scale)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(self._reference_input(x2), self.dequantized_weight().to(x2.device), self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _reference_input(self, x2: torch.Tensor) -> torch.Tensor:
        """The quantize-dequantize of the input that the chosen kernel performs, in float ops."""
        eps = torch.finfo(torch.float32).eps
        if self.kernel == "fbgemm":
            # fbgemm: one affine uint8 range per call, reduced to 7 bits (PyTorch's x86 default).
            lo, hi = x2.min().clamp(max=0), x2.max().clamp(min=0)
            scale = ((hi - lo) / 127.0).clamp_min(eps)
            zero = torch.clamp(torch.round(-lo / scale), 0, 127)
            return (torch.clamp(torch.round(x2 / scale) + zero, 0, 127) - zero) * scale
        sx = (x2.abs().amax(1, keepdim=True) / 127.0).clamp_min(eps)
        return torch.clamp(torch.round(x2 / sx), -127, 127) * sx

    def _get_packed(self):
        if self._packed is None:
            bias = None if self.bias is None else self.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(
                _per_channel_qtensor(self.weight_int8, self.weight_scale), bias)
        return self._packed

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._packed = None
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, kernel={self.kernel!r}")


class DynamicInt8RNN(nn.Module):
    """An LSTM or GRU with int8 weights (per gate-row scales) run by PyTorch's dynamic quantized RNN kernel.

    Same call signature and outputs as the ``nn.LSTM`` / ``nn.GRU`` it replaces. Without PyTorch's
    quantized ops it runs the float RNN on the dequantized weights (with a warning).
    """

    onnx_unsupported = ("dynamic int8 LSTM/GRU kernels have no ONNX form here; export the float model, or "
                        "exclude this layer from DynamicQuantization")

    def __init__(self, mode: str, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False):
        super().__init__()
        if mode not in ("LSTM", "GRU"):
            raise TorchslimError(f"DynamicInt8RNN mode must be 'LSTM' or 'GRU', got {mode!r}")
        self.mode, self.input_size, self.hidden_size, self.num_layers = mode, input_size, hidden_size, num_layers
        self.has_bias, self.batch_first, self.dropout, self.bidirectional = bias, batch_first, dropout, bidirectional
        gates = 4 if mode == "LSTM" else 3
        for name in self._weight_names():
            layer = int(name.split("_l")[1].split("_")[0])
            rows = gates * hidden_size
            cols = (input_size if layer == 0 else hidden_size * (2 if bidirectional else 1)) if "_ih_" in name \
                else hidden_size
            self.register_buffer(name, torch.zeros(rows, cols, dtype=torch.int8))
            self.register_buffer(name + "_scale", torch.ones(rows))
            self.register_buffer(name.replace("weight", "bias"), torch.zeros(rows))
        self._kernel = None

    def _weight_names(self) -> list[str]:
        suffixes = ["", "_reverse"] if self.bidirectional else [""]
        return [f"weight_{k}_l{layer}{s}" for layer in range(self.num_layers) for s in suffixes for k in ("ih", "hh")]

    def _args(self) -> dict[str, Any]:
        return {"mode": self.mode, "input_size": self.input_size, "hidden_size": self.hidden_size,
                "num_layers": self.num_layers, "bias": self.has_bias, "batch_first": self.batch_first,
                "dropout": self.dropout, "bidirectional": self.bidirectional}

    @classmethod
    def from_float(cls, rnn: nn.LSTM | nn.GRU, per_channel: bool = True) -> "DynamicInt8RNN":
        if type(rnn) not in (nn.LSTM, nn.GRU):
            raise UnsupportedModelError(f"DynamicInt8RNN replaces nn.LSTM and nn.GRU, got {type(rnn).__name__}")
        if getattr(rnn, "proj_size", 0):
            raise UnsupportedModelError("LSTM with proj_size > 0 has no dynamic int8 kernel")
        q = cls(rnn.mode, rnn.input_size, rnn.hidden_size, rnn.num_layers, rnn.bias, rnn.batch_first,
                float(rnn.dropout), rnn.bidirectional)
        with torch.no_grad():
            for name in q._weight_names():
                codes, scale = quantize_weight_per_channel(getattr(rnn, name), per_channel)
                getattr(q, name).copy_(codes)
                getattr(q, name + "_scale").copy_(scale)
                if rnn.bias:
                    getattr(q, name.replace("weight", "bias")).copy_(getattr(rnn, name.replace("weight", "bias")))
        return q

    def _build_kernel(self) -> nn.Module:
        if _ao_available():
            try:
                from torch.ao.nn.quantized.dynamic import GRU, LSTM

                cls = LSTM if self.mode == "LSTM" else GRU
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    kernel = cls(self.input_size, self.hidden_size, self.num_layers, True, self.batch_first,
                                 self.dropout, self.bidirectional, dtype=torch.qint8)
                    weights = {}
                    for name in self._weight_names():
                        weights[name] = _per_channel_qtensor(getattr(self, name), getattr(self, name + "_scale"))
                        bias_name = name.replace("weight", "bias")
                        weights[bias_name] = getattr(self, bias_name).float()
                    kernel.set_weight_bias(weights)
                return kernel.eval()
            except (ImportError, RuntimeError, AttributeError) as exc:  # pragma: no cover - depends on the build
                warnings.warn(f"DynamicInt8RNN: PyTorch's dynamic quantized {self.mode} is unavailable ({exc}); "
                              "running the float kernel on dequantized weights", RuntimeWarning, stacklevel=3)
        cls = nn.LSTM if self.mode == "LSTM" else nn.GRU
        kernel = cls(self.input_size, self.hidden_size, self.num_layers, True, self.batch_first, self.dropout,
                     self.bidirectional)
        with torch.no_grad():
            for name in self._weight_names():
                getattr(kernel, name).copy_(getattr(self, name).float() * getattr(self, name + "_scale")[:, None])
                getattr(kernel, name.replace("weight", "bias")).copy_(getattr(self, name.replace("weight", "bias")))
        return kernel.eval()

    def forward(self, input, hx=None):  # noqa: A002 - same signature as nn.LSTM
        if self._kernel is None:
            object.__setattr__(self, "_kernel", self._build_kernel())  # not a child: never saved or moved
        return self._kernel(input, hx)

    def _load_from_state_dict(self, *args, **kwargs):
        object.__setattr__(self, "_kernel", None)
        return super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        object.__setattr__(self, "_kernel", None)
        return super()._apply(fn, recurse)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_kernel"] = None
        return state

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._args().items())


CODECS = (
    ModuleCodec(DynamicInt8Linear,
                lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                           "kernel": m.kernel},
                lambda a: DynamicInt8Linear(**a)),
    ModuleCodec(DynamicInt8RNN, lambda m: m._args(), lambda a: DynamicInt8RNN(**a)),
)
"""Checkpoint codecs of the dynamic int8 modules."""
