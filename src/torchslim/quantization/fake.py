"""Fake quantization for training: straight-through estimators and the quantizer modules QAT inserts.

Every quantizer here is an ``nn.Module`` that maps a float tensor to its quantize-dequantize value in
``forward`` (differentiable through a straight-through estimator) and exposes the integer form that
:func:`torchslim.quantization.qat.convert` stores: ``codes(x)``, ``qparams(x)`` and ``code_range()``.

- :class:`MinMaxQuantizer` -- uniform, range from min/max: of the tensor itself (weights) or observed over
  batches (activations: running min/max while calibrating, an exponential moving average while training).
- :class:`LSQQuantizer` -- uniform with a learned step size (LSQ, Esser et al. 2020).
- :class:`BinaryQuantizer` -- sign(w) times a per-channel scale (BWN / XNOR-Net, Rastegari et al. 2016).
- :class:`TernaryQuantizer` -- {-1, 0, +1} times a per-channel scale, threshold 0.7 * mean|w| (TWN,
  Li et al. 2016), scale closed-form or learned.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.errors import ConfigError, DataError, TorchslimError
from .spec import QuantSpec

__all__ = [
    "FakeQuantize", "fake_quantize", "round_ste", "grad_scale",
    "MinMaxQuantizer", "LSQQuantizer", "BinaryQuantizer", "TernaryQuantizer", "Quantizer",
]

_EPS = torch.finfo(torch.float32).eps


class FakeQuantize(torch.autograd.Function):
    """Quantize-dequantize with the straight-through estimator: the gradient passes unchanged where the
    value falls inside the representable range [qmin, qmax] and is zero where it was clipped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
        q = torch.round(x / scale) + zero
        inside = (q >= qmin) & (q <= qmax)
        ctx.save_for_backward(inside)
        return (q.clamp(qmin, qmax) - zero) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmin: int, qmax: int,
                  group_size: int | None = None) -> torch.Tensor:
    """Straight-through fake quantization of ``x``; ``scale``/``zero`` broadcast against ``x`` (or against
    its view in groups of ``group_size`` along the last dimension)."""
    if group_size:
        g = x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
        return FakeQuantize.apply(g, scale, zero, qmin, qmax).reshape(x.shape)
    return FakeQuantize.apply(x, scale, zero, qmin, qmax)


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def _ste(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity's gradient with respect to ``x`` in the backward pass.

    Without autograd the exact ``value`` is returned: ``x + (value - x)`` can be off by one ulp, and the
    converted model must reproduce the trained one exactly.
    """
    return x + (value - x).detach() if _needs_grad(x) else value


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity."""
    return _ste(x, torch.round(x))


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` in the forward pass, gradient multiplied by ``g`` in the backward pass (LSQ's step gradient scale)."""
    return x * g + (x - x * g).detach() if _needs_grad(x) else x


def _channel_view(v: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A 1-D per-channel tensor shaped to broadcast along ``axis`` of ``x``."""
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return v.reshape(shape)


def _per_channel_mean_abs(w: torch.Tensor, nonzero_only: bool = False) -> torch.Tensor:
    """Mean |w| of each output channel (dim 0), optionally over the non-zero (unpruned) entries only."""
    a = w.detach().abs().reshape(w.shape[0], -1)
    if not nonzero_only:
        return a.mean(1)
    count = (a != 0).sum(1).clamp_min(1)
    return a.sum(1) / count


class Quantizer(nn.Module):
    """Base of the quantizer modules. ``where`` names the tensor (e.g. ``"fc1 input"``) in error messages."""

    # Learned steps and scales are quantization tables, not weights: profiles count them apart.
    table_params: tuple[str, ...] = ("step", "alpha")

    bits: int
    where: str = ""

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) of ``x``, such that ``(codes - zero) * scale`` equals ``forward(x)``."""
        raise NotImplementedError

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` broadcastable against ``x`` (weights) or against any activation."""
        raise NotImplementedError

    def code_range(self) -> tuple[int, int]:
        raise NotImplementedError

    def start_calibration(self) -> None:
        """Enter calibration (quantizers without observed state ignore it)."""

    def stop_calibration(self) -> None:
        """Leave calibration."""


class MinMaxQuantizer(Quantizer):
    """Uniform quantization by ``spec`` with the range from min/max.

    ``observe=False`` (weights): the range of the tensor itself at every call, so it follows training.
    ``observe=True`` (activations): the range is state. It is set from the first batch seen; afterwards a
    training-mode forward moves it by an exponential moving average (``momentum``), and between
    :meth:`start_calibration` and :meth:`stop_calibration` it tracks the running min and max.
    """

    def __init__(self, spec: QuantSpec, *, observe: bool = False, momentum: float = 0.01, where: str = ""):
        super().__init__()
        if observe and spec.granularity != "tensor":
            raise ConfigError(f"{where or 'activation'}: observed (activation) ranges are per tensor; got "
                              f"granularity={spec.granularity!r}")
        self.spec = spec
        self.bits = spec.bits
        self.observe = observe
        self.momentum = momentum
        self.where = where
        self.calibrating = False
        self._restart = False
        if observe:
            self.register_buffer("lo", torch.zeros(()))
            self.register_buffer("hi", torch.zeros(()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        s = self.spec
        return (f"bits={s.bits}, symmetric={s.symmetric}, granularity={s.granularity}, signed={s.signed}, "
                f"observe={self.observe}")

    def start_calibration(self) -> None:
        """Track the running min/max of the following batches, starting afresh."""
        self.calibrating = True
        self._restart = True

    def stop_calibration(self) -> None:
        self.calibrating = False

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise TorchslimError(f"{self.where or 'activation'}: the tensor contains NaN/inf values, so it has no "
                                 "quantization range; check the input data and the layers before it")
        lo, hi = x.min().float(), x.max().float()
        if not bool(self.initialized) or self._restart:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.initialized.fill_(True)
            self._restart = False
        elif self.calibrating:
            self.lo.copy_(torch.minimum(self.lo, lo))
            self.hi.copy_(torch.maximum(self.hi, hi))
        else:
            self.lo.lerp_(lo, self.momentum)
            self.hi.lerp_(hi, self.momentum)

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.observe:
            if not bool(self.initialized):
                raise TorchslimError(f"{self.where or 'activation'}: the quantization range was never observed; run "
                                     "torchslim.quantization.qat.calibrate(model, data) or train before converting")
            return self.spec.qparams(self.lo, self.hi)
        if x is None:
            raise TorchslimError("a weight quantizer needs the weight to compute its range")
        return self.spec.qparams(*self.spec.minmax(x.detach()))

    def code_range(self) -> tuple[int, int]:
        return self.spec.qmin, self.spec.qmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe and (self.training or self.calibrating or not bool(self.initialized)):
            self._observe(x)
        scale, zero = self.qparams(x)
        group = self.spec.group_size if self.spec.granularity == "group" else None
        return fake_quantize(x, scale.to(x.dtype), zero, self.spec.qmin, self.spec.qmax, group)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        scale, zero = self.qparams(x)
        return self.spec.quantize(x.detach(), scale, zero)


class LSQQuantizer(Quantizer):
    """Uniform quantization with a learned step size (LSQ, Esser et al. 2020), zero point 0.

    ``v_hat = round(clip(v / s, -Qn, Qp)) * s`` with the step ``s`` a parameter trained with the network;
    its gradient is scaled by ``g = 1 / sqrt(N * Qp)`` (``N`` = elements per step) and it is initialised to
    ``2 * mean|v| / sqrt(Qp)`` from the first tensor seen. Weights use the signed range of ``spec``
    (per tensor or per output channel); activations (``activation=True``, one step per tensor) use the
    unsigned range [0, 2^b - 1] when the first batch has no negative value (after ReLU), else the
    signed one.
    """

    def __init__(self, spec: QuantSpec, channels: int = 1, *, activation: bool = False, where: str = ""):
        super().__init__()
        if not spec.symmetric:
            raise ConfigError(f"{where or 'LSQ'}: a learned step (LSQ) has no zero point, so it needs symmetric=True")
        if spec.granularity == "group" or (activation and spec.granularity != "tensor"):
            raise ConfigError(f"{where or 'LSQ'}: learned steps are per tensor{'' if activation else ' or per channel'}"
                              f", got granularity={spec.granularity!r}")
        if spec.granularity == "channel" and spec.axis != 0:
            raise ConfigError(f"{where or 'LSQ'}: per-channel learned steps are along the output channels (axis=0), "
                              f"got axis={spec.axis}")
        if spec.bits == 1:
            raise ConfigError(f"{where or 'LSQ'}: 1-bit has no step to learn; use BinaryWeights for 1-bit weights")
        self.spec = spec
        self.bits = spec.bits
        self.activation = activation
        self.where = where
        n = channels if spec.granularity == "channel" else 1
        self.step = nn.Parameter(torch.ones(n))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.tensor(bool(spec.signed)))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, granularity={self.spec.granularity}, activation={self.activation}"

    def _bounds(self) -> tuple[int, int]:
        b = self.bits
        if bool(self.signed):
            return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        return 0, 2 ** b - 1

    def code_range(self) -> tuple[int, int]:
        return self._bounds()

    @torch.no_grad()
    def _initialise(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise TorchslimError(f"{self.where or 'LSQ'}: the tensor contains NaN/inf values, so its step cannot be "
                                 "initialised; check the input data and the layers before it")
        if self.activation:
            self.signed.fill_(bool(x.min() < 0))
        qp = self._bounds()[1]
        if self.activation:
            mean_abs = x.detach().abs().mean().reshape(1)
            if not bool(mean_abs > 0):
                raise DataError(f"{self.where or 'LSQ'}: the first batch is all zeros, so the step size cannot be "
                                "initialised from it; pass varied calibration data (data=)")
        else:
            # Over the unpruned weights: zeros from a pruning mask would shrink the step and clip the rest.
            w = x.detach() if self.step.numel() > 1 else x.detach().reshape(1, -1)
            mean_abs = _per_channel_mean_abs(w, nonzero_only=True)
            alive = mean_abs > 0
            if not bool(alive.any()):
                raise DataError(f"{self.where or 'LSQ'}: every weight is zero, so there is nothing to quantize; "
                                "exclude the layer (exclude=(...))")
            # A fully pruned channel quantizes to code 0 whatever its step; give it a typical one.
            mean_abs = torch.where(alive, mean_abs, mean_abs[alive].mean())
        self.step.copy_(2 * mean_abs.float() / math.sqrt(qp))
        self.initialized.fill_(True)

    def _step(self, x: torch.Tensor) -> torch.Tensor:
        s = self.step.abs() + _EPS  # a step driven through zero must not flip sign or divide by zero
        return _channel_view(s, x, self.spec.axis) if s.numel() > 1 else s.reshape(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            self._initialise(x)
        qmin, qmax = self._bounds()
        per_step = x.numel() / self.step.numel()
        if self.activation and x.dim() > 1:
            per_step /= x.shape[0]  # N counts the features of one sample
        g = 1.0 / math.sqrt(max(per_step, 1.0) * qmax)
        s = grad_scale(self._step(x), g)
        return round_ste(torch.clamp(x / s, qmin, qmax)) * s

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(self.initialized):
            raise TorchslimError(f"{self.where or 'LSQ'}: the step was never initialised; run calibration or a "
                                 "forward pass before converting")
        if x is not None:
            s = self._step(x).detach()
        else:
            s = (self.step.detach().abs() + _EPS).reshape(())
        return s, torch.zeros_like(s, dtype=torch.int64)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self._bounds()
        s, _ = self.qparams(x)
        return torch.clamp(torch.round(x.detach() / s), qmin, qmax).to(torch.int64)


class BinaryQuantizer(Quantizer):
    """Binary weights ``alpha * sign(w)`` with ``alpha`` = mean |w| of each output channel (BWN).

    The gradient reaches ``w`` through a straight-through sign. Weights that are exactly zero (pruned)
    stay zero, and ``alpha`` is then the mean over the unpruned weights, the least-squares optimum for
    that support.
    """

    bits = 1

    def __init__(self, where: str = ""):
        super().__init__()
        self.where = where

    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        a = w.abs().reshape(w.shape[0], -1)
        return a.sum(1) / (a.detach() != 0).sum(1).clamp_min(1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        sign = _ste(w, torch.sign(w.detach()))
        return _channel_view(self._alpha(w), w, 0) * sign

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            raise TorchslimError("a binary weight quantizer needs the weight to compute its scale")
        a = _channel_view(self._alpha(x.detach()), x, 0)
        return a, torch.zeros_like(a, dtype=torch.int64)

    def code_range(self) -> tuple[int, int]:
        return -1, 1

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sign(x.detach()).to(torch.int64)


class TernaryQuantizer(Quantizer):
    """Ternary weights ``alpha * t`` with ``t`` in {-1, 0, +1} (TWN, Li et al. 2016).

    ``t = sign(w)`` where ``|w| > threshold * mean|w|`` (per output channel, over the unpruned weights),
    else 0. ``alpha`` is the closed-form optimum, the mean |w| of the kept weights, or with
    ``learned_scale=True`` a parameter per channel initialised to it and trained (as in TTQ). The gradient
    reaches ``w`` through a straight-through estimator.
    """

    bits = 2

    def __init__(self, channels: int, threshold: float = 0.7, learned_scale: bool = False, where: str = ""):
        super().__init__()
        self.threshold = threshold
        self.learned_scale = learned_scale
        self.where = where
        if learned_scale:
            self.alpha = nn.Parameter(torch.ones(channels))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}, learned_scale={self.learned_scale}"

    def _ternary(self, w: torch.Tensor) -> torch.Tensor:
        delta = self.threshold * _per_channel_mean_abs(w, nonzero_only=True)
        delta = _channel_view(delta, w, 0)
        w = w.detach()
        return (w > delta).to(w.dtype) - (w < -delta).to(w.dtype)

    def _closed_form(self, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        kept = t.abs().reshape(w.shape[0], -1)
        return (w.abs().reshape(w.shape[0], -1) * kept).sum(1) / kept.sum(1).clamp_min(1)

    def _scale(self, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.learned_scale:
            if not bool(self.initialized):
                with torch.no_grad():
                    self.alpha.copy_(self._closed_form(w.detach(), t))
                    self.initialized.fill_(True)
            return self.alpha.abs()
        return self._closed_form(w, t)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        t = self._ternary(w)
        return _channel_view(self._scale(w, t), w, 0) * _ste(w, t)

    def qparams(self, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            raise TorchslimError("a ternary weight quantizer needs the weight to compute its scale")
        x = x.detach()
        a = _channel_view(self._scale(x, self._ternary(x)).detach(), x, 0)
        return a, torch.zeros_like(a, dtype=torch.int64)

    def code_range(self) -> tuple[int, int]:
        return -1, 1

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        return self._ternary(x).to(torch.int64)
