"""Post-training quantization: static int8 (calibrated, real integer kernels), dynamic int8, weight-only
low-bit, and fp8 on CUDA. This module holds the configs; the ``apply_*``
functions are in :mod:`.static` (static int8) and :mod:`.convert` (the others); each returns a new model (the
input model is never modified).

- :class:`StaticQuantization` -> :func:`apply_static`: Conv-BN folding, export to ONNX, calibration of every
  activation with a torchslim observer, an int8 graph (weights int8 per channel, activations uint8, ReLU
  folded into the producer) run by integer kernels; ``backend="auto"`` measures ONNX Runtime (QDQ and
  QOperator forms) and PyTorch's onednn/x86 engines side by side and keeps the fastest.
- :class:`DynamicQuantization` -> :func:`apply_dynamic`: Linear / LSTM / GRU with int8 weights, activations
  quantized per call (PyTorch's fbgemm/oneDNN kernels).
- :class:`WeightOnly` -> :func:`apply_weight_only`: 2- to 8-bit grouped weights for Linear layers (round to
  nearest or GPTQ).
- :class:`Float8` -> :func:`apply_fp8`: e4m3 Linear layers through ``torch._scaled_mm``, kept only where
  measured faster than bf16 on the GPU.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from torch import nn

from ..core.checks import check_choice, check_finite, check_fraction, check_positive
from ..core.config import Config
from ..core.errors import ConfigError, UnsupportedModelError
from .backends import STATIC_BACKENDS
from .backends.weight_only import WEIGHT_ONLY_BITS
from .observers import OBSERVERS
from .spec import QuantSpec

__all__ = ["StaticQuantization", "DynamicQuantization", "WeightOnly", "Float8", "ACTIVATION_SPEC", "report_float"]

ACTIVATION_SPEC = QuantSpec(bits=8, symmetric=False, signed=False)
"""Activations of static int8 models: uint8, affine (what x86 int8 kernels are fastest with)."""

_POLICIES = ("warn", "raise")
DYNAMIC_LAYERS = {"Linear": nn.Linear, "LSTM": nn.LSTM, "GRU": nn.GRU}


def _check_patterns(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{name} must be a tuple of layer-name patterns (fnmatch), got {value!r}")


def _check_bits(value: Any, allowed: tuple[int, ...], hint: str) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ConfigError(f"bits={value!r} is not supported here; choose one of {list(allowed)}. {hint}")


@dataclasses.dataclass(frozen=True)
class StaticQuantization(Config):
    """Static int8 post-training quantization with real integer kernels (ONNX Runtime on CPU).

    ``observer`` picks how each activation's range is calibrated on ``calibration_batches`` batches
    (``minmax``, ``moving_average``, ``percentile`` at ``percentile``%, ``mse``, ``entropy``). Weights are
    int8 symmetric, per output channel when ``per_channel``. ``backend``: ``auto`` (time every available
    backend side by side on the example batch and keep the fastest), or one of ``ort_qdq`` / ``ort_qop``
    (ONNX Runtime, QDQ or QOperator graph) and ``torch_onednn`` / ``torch_x86`` (PyTorch's quantized
    kernels). The model's inputs are calibrated
    with ``input_observer`` (``minmax`` by default: clipping an input loses information no later layer can
    recover; ``None`` uses ``observer``). ``exclude`` keeps matching layers
    (fnmatch on module names) in float. Ops without an int8 kernel stay in float; ``on_unsupported`` says
    whether that warns (naming them) or raises.

    ``reduce_range`` quantizes weights to 7 bits (in int8 storage). ``None`` (the default) turns it on where
    the CPU's int8 kernels would otherwise saturate (x86 without VNNI, see
    :mod:`~torchslim.quantization.backends.cpu`; ``TORCHSLIM_CPU_INT8=avx2|vnni`` overrides the detection)
    and the model's ``info`` records the choice. After conversion the int8 outputs are compared with the
    float model's on the example batch; a drift beyond ``AGREEMENT_TOLERANCE`` warns, naming the output.
    """

    bits: int = 8
    per_channel: bool = True
    observer: str = "minmax"
    input_observer: str | None = "minmax"
    percentile: float = 99.99
    calibration_batches: int = 16
    backend: str = "auto"
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "warn"
    opset: int | None = None
    reduce_range: bool | None = None

    def validate(self) -> None:
        if self.reduce_range is not None and not isinstance(self.reduce_range, bool):
            raise ConfigError(f"reduce_range must be True, False or None (decided by the CPU), got "
                              f"{self.reduce_range!r}")
        _check_bits(self.bits, (8,), "Static quantization runs on int8 kernels; for 4- or 2-bit weights use "
                                     "WeightOnly(bits=4, group_size=32) or QAT")
        check_choice("observer", self.observer, tuple(OBSERVERS))
        if self.input_observer is not None:
            check_choice("input_observer", self.input_observer, tuple(OBSERVERS))
        check_finite("percentile", self.percentile)
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile!r}")
        check_positive("calibration_batches", self.calibration_batches, integer=True)
        check_choice("backend", self.backend, ("auto", *STATIC_BACKENDS))
        _check_patterns("exclude", self.exclude)
        check_choice("on_unsupported", self.on_unsupported, _POLICIES)
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)
                                       or self.opset < 13):
            raise ConfigError(f"opset must be an int >= 13 (per-channel QDQ needs 13), got {self.opset!r}")


@dataclasses.dataclass(frozen=True)
class DynamicQuantization(Config):
    """Dynamic int8: weights of ``layers`` (any of Linear, LSTM, GRU) stored in int8, activations quantized
    on the fly at every call. Layers with weights but no dynamic kernel (Conv, Embedding, ...) stay float;
    ``on_unsupported`` says whether that warns (naming them) or raises."""

    bits: int = 8
    layers: tuple[str, ...] = ("Linear", "LSTM", "GRU")
    per_channel: bool = True
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "warn"

    def validate(self) -> None:
        _check_bits(self.bits, (8,), "Dynamic quantization runs on int8 kernels; for 4-bit weights use WeightOnly")
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ConfigError(f"layers must be a non-empty tuple drawn from {list(DYNAMIC_LAYERS)}, got "
                              f"{self.layers!r}")
        for layer in self.layers:
            check_choice("layers[...]", layer, tuple(DYNAMIC_LAYERS))
        _check_patterns("exclude", self.exclude)
        check_choice("on_unsupported", self.on_unsupported, _POLICIES)


@dataclasses.dataclass(frozen=True)
class WeightOnly(Config):
    """Weight-only quantization of Linear layers to ``bits`` (2 to 8; integer kernels for 4 and 8) in groups of
    ``group_size`` inputs (0: one group per output channel, the whole row), symmetric (codes around zero) or
    affine; activations stay float. On CUDA with ``require_speedup`` a layer is kept only where its kernel
    measures faster than bf16 for its shape. ``method``: ``rtn`` rounds each weight to nearest; ``gptq``
    (Frantar et al. 2023) quantizes column by column, compensating each rounding error on the remaining weights
    through the inverse Hessian of the layer's inputs over ``calibration_batches`` batches of ``data``
    (``damp``: dampening, share of the Hessian's mean diagonal; ``act_order``: inputs with the largest Hessian
    diagonal first, group scales from the weights before any update). Both give the same layers, checkpoint and
    kernels."""

    bits: int = 4
    group_size: int = 32
    symmetric: bool = True
    exclude: tuple[str, ...] = ()
    on_unsupported: str = "warn"
    require_speedup: bool = False
    method: str = "rtn"
    calibration_batches: int = 8
    damp: float = 0.01
    act_order: bool = False

    def validate(self) -> None:
        _check_bits(self.bits, WEIGHT_ONLY_BITS, "For 1-bit weights use BinaryWeights (or QAT)")
        if self.group_size != 0:
            check_positive("group_size", self.group_size, integer=True)
        _check_patterns("exclude", self.exclude)
        check_choice("on_unsupported", self.on_unsupported, _POLICIES)
        check_choice("method", self.method, ("rtn", "gptq"))
        check_positive("calibration_batches", self.calibration_batches, integer=True)
        check_fraction("damp", self.damp, allow_zero=False, allow_one=True)
        if not isinstance(self.act_order, bool):
            raise ConfigError(f"act_order must be True or False, got {self.act_order!r}")
        if self.act_order and self.method != "gptq":
            raise ConfigError("act_order orders GPTQ's columns: it needs method='gptq'")


@dataclasses.dataclass(frozen=True)
class Float8(Config):
    """fp8 (e4m3) Linear layers through ``torch._scaled_mm`` on GPUs with fp8 tensor cores.

    Each layer is timed against bf16 at its own shape (``rows`` input rows; default: measured from
    ``example_inputs``, else 64) and kept in fp8 only when at least ``min_speedup`` times faster. Without such
    a GPU, ``emulate=True`` still converts every layer (exact fp8 numerics in float, no speed-up), otherwise
    an error is raised.
    """

    exclude: tuple[str, ...] = ()
    min_speedup: float = 1.0
    rows: int | None = None
    emulate: bool = False

    def validate(self) -> None:
        _check_patterns("exclude", self.exclude)
        check_positive("min_speedup", self.min_speedup)
        if self.rows is not None:
            check_positive("rows", self.rows, integer=True)


def report_float(layers: list[dict[str, str]], policy: str, what: str, how: str | None = None) -> None:
    """Warn (or raise, by ``policy``) that ``layers`` (``{"layer", "op"[, "reason"]}``) stay in float; ``how``
    says what runs them when they have no integer kernel."""
    if not layers:
        return
    names = ", ".join(f"{d['layer']} ({d['op']}" + (f": {d['reason']}" if d.get("reason") else "") + ")"
                      for d in layers[:12])
    more = f" and {len(layers) - 12} more" if len(layers) > 12 else ""
    why = f"have no integer kernel and stay in float ({how})" if how else "stay in float"
    message = (f"{what}: {len(layers)} layer(s) {why}: {names}{more}. "
               "Pass exclude=[...] to keep them float on purpose, or on_unsupported='raise' to make this an error")
    if policy == "raise":
        raise UnsupportedModelError(message)
    warnings.warn(message, UserWarning, stacklevel=3)
