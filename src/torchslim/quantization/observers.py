"""Calibration observers: watch a tensor over calibration batches, then choose its quantization range.

Every observer has ``update(x)`` (called once per batch) and ``qparams() -> (scale, zero_point)`` (via
:meth:`QuantSpec.qparams`), plus ``range() -> (lo, hi)``, the clipping range it chose.

- ``minmax`` -- the running min and max (per tensor, per channel or per group, as the spec says);
- ``moving_average`` -- an exponential moving average of each batch's min and max;
- ``percentile`` -- clip the ``percentile``% tails of a 2048-bin histogram (e.g. 99.99);
- ``mse`` -- the clipping that minimises the expected quantization MSE, by grid search on the histogram;
- ``entropy`` -- TensorRT's KL-divergence calibration on a 2048-bin histogram of ``|x|``.

Observers raise :class:`DataError` naming the layer when they never saw data, or saw NaN/inf values.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.checks import check_choice
from ..core.errors import ConfigError, DataError
from .spec import QuantSpec

__all__ = ["Observer", "MinMaxObserver", "MovingAverageObserver", "PercentileObserver", "MSEObserver",
           "EntropyObserver", "make_observer", "OBSERVERS"]

_TINY = 1e-12


class Observer:
    """Base class: collects statistics of one tensor (named ``layer`` in errors) for ``spec``."""

    per_channel_ok = True

    def __init__(self, spec: QuantSpec, layer: str = "tensor"):
        if spec.granularity != "tensor" and not self.per_channel_ok:
            raise ConfigError(f"{type(self).__name__} works per tensor (histogram based), but the spec asks for "
                              f"granularity={spec.granularity!r} for {layer!r}; use 'minmax' or 'moving_average' "
                              "for per-channel/per-group ranges")
        self.spec = spec
        self.layer = layer
        self.batches = 0
        self.data_min = math.inf
        self.data_max = -math.inf

    def update(self, x: torch.Tensor) -> None:
        """Record one batch of the observed tensor."""
        if not torch.is_tensor(x):
            raise DataError(f"layer {self.layer!r}: observer expects a tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise DataError(f"layer {self.layer!r}: calibration produced an empty tensor {tuple(x.shape)}; "
                            "pass calibration batches with at least one sample")
        x = x.detach().float()
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):  # min/max propagate NaN, so one pass tells
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(f"layer {self.layer!r}: {bad} of {x.numel()} calibration values are NaN/inf, so no "
                            "quantization range can be chosen; check the model's weights (torchslim.metrics.profile "
                            "reports NaN weights) and that the calibration inputs are finite")
        self.data_min = min(self.data_min, lo)
        self.data_max = max(self.data_max, hi)
        self.batches += 1
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _check_seen(self) -> None:
        if self.batches == 0:
            raise DataError(f"layer {self.layer!r}: the observer was never updated: the calibration data was empty "
                            "or never reached this layer; pass calibration data (data=) with at least one batch")

    @property
    def is_constant(self) -> bool:
        """True when every observed value was the same number (a degenerate range)."""
        self._check_seen()
        return self.data_min == self.data_max

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(lo, hi)`` (shaped like :meth:`QuantSpec.minmax` output)."""
        self._check_seen()
        return self._range()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` for the chosen range (0 is always exactly representable)."""
        return self.spec.qparams(*self.range())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, batches={self.batches})"


class MinMaxObserver(Observer):
    """Running minimum and maximum (per tensor, channel or group as ``spec`` says)."""

    def __init__(self, spec: QuantSpec, layer: str = "tensor"):
        super().__init__(spec, layer)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = _block_minmax(self.spec, x, self.layer)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            _check_shape(self.lo, lo, self.layer)
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo.clone(), self.hi.clone()


class MovingAverageObserver(MinMaxObserver):
    """Exponential moving average of each batch's min/max: ``r <- (1 - c) r + c r_batch``."""

    def __init__(self, spec: QuantSpec, layer: str = "tensor", averaging_constant: float = 0.01):
        super().__init__(spec, layer)
        if not 0 < averaging_constant <= 1:
            raise ConfigError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.c = averaging_constant

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = _block_minmax(self.spec, x, self.layer)
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            _check_shape(self.lo, lo, self.layer)
            self.lo = self.lo + self.c * (lo - self.lo)
            self.hi = self.hi + self.c * (hi - self.hi)


def _block_minmax(spec: QuantSpec, x: torch.Tensor, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    if spec.granularity == "channel" and not -x.dim() <= spec.axis < x.dim():
        raise ConfigError(f"layer {layer!r}: per-channel axis {spec.axis} does not exist in a {x.dim()}-d tensor")
    try:
        return spec.minmax(x)
    except ConfigError as exc:
        raise ConfigError(f"layer {layer!r}: {exc}") from None


def _check_shape(old: torch.Tensor, new: torch.Tensor, layer: str) -> None:
    if old.shape != new.shape:
        raise DataError(f"layer {layer!r}: per-channel statistics changed shape between batches "
                        f"({tuple(old.shape)} -> {tuple(new.shape)}); calibration batches must agree in every "
                        "dimension but the reduced ones")


class _HistogramObserver(Observer):
    """A ``bins``-bin histogram over a range that grows to cover every batch (re-binned when it grows)."""

    per_channel_ok = False

    def __init__(self, spec: QuantSpec, layer: str = "tensor", bins: int = 2048):
        super().__init__(spec, layer)
        if bins < 16:
            raise ConfigError(f"bins must be >= 16, got {bins}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # float64 counts
        self.lo = 0.0
        self.hi = 0.0

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)

    def _update(self, x: torch.Tensor) -> None:
        v = self._values(x)
        if v.numel() == 0:
            v = torch.zeros(1)
        # 0 is always inside the quantized range, so the histogram always spans it too.
        lo, hi = min(float(v.min()), 0.0), max(float(v.max()), 0.0)
        if self.hist is None:
            self.lo, self.hi = lo, max(hi, lo + _TINY)
            self.hist = torch.zeros(self.bins, dtype=torch.float64)
        elif lo < self.lo or hi > self.hi:
            self._rebin(min(lo, self.lo), max(hi, self.hi))
        self.hist += torch.histc(v, self.bins, self.lo, self.hi).double()

    def _rebin(self, lo: float, hi: float) -> None:
        old_width = (self.hi - self.lo) / self.bins
        centers = self.lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * old_width
        idx = ((centers - lo) / ((hi - lo) / self.bins)).floor().clamp(0, self.bins - 1).long()
        self.hist = torch.bincount(idx, weights=self.hist, minlength=self.bins)
        self.lo, self.hi = lo, hi

    def edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def centers(self) -> torch.Tensor:
        e = self.edges()
        return (e[:-1] + e[1:]) / 2

    @staticmethod
    def _pair(lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)


class PercentileObserver(_HistogramObserver):
    """Clip the lowest and highest ``(100 - percentile)``% of the values (histogram based)."""

    def __init__(self, spec: QuantSpec, layer: str = "tensor", percentile: float = 99.99, bins: int = 2048):
        super().__init__(spec, layer, bins)
        if not 50 < percentile <= 100:
            raise ConfigError(f"percentile must be in (50, 100], got {percentile}")
        self.percentile = percentile

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        cdf = torch.cumsum(self.hist, 0) / self.hist.sum()
        tail = 1.0 - self.percentile / 100.0
        edges = self.edges()
        lo_bin = int(torch.searchsorted(cdf, torch.tensor(tail, dtype=torch.float64)))
        hi_bin = int(torch.searchsorted(cdf, torch.tensor(1.0 - tail, dtype=torch.float64)))
        lo = max(float(edges[min(lo_bin, self.bins - 1)]), self.data_min)
        hi = min(float(edges[min(hi_bin + 1, self.bins)]), self.data_max)
        return self._pair(lo, hi)


class MSEObserver(_HistogramObserver):
    """The range ``ratio * [min, max]`` that minimises the expected quantization MSE over ``grid`` ratios."""

    def __init__(self, spec: QuantSpec, layer: str = "tensor", bins: int = 2048, grid: int = 100,
                 min_ratio: float = 0.05):
        super().__init__(spec, layer, bins)
        self.ratios = torch.linspace(min_ratio, 1.0, grid, dtype=torch.float64)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.data_min, self.data_max
        losses = self.losses(lo, hi)
        best = float(self.ratios[int(torch.argmin(losses))])
        return self._pair(lo * best if lo < 0 else lo, hi * best if hi > 0 else hi)

    def losses(self, lo: float, hi: float) -> torch.Tensor:
        """Expected squared error of each candidate clipping ratio (bin centers weighted by counts)."""
        c, n = self.centers(), self.hist
        r = self.ratios[:, None]
        # Only the side(s) away from zero are clipped; the range always keeps 0.
        los = r * lo if lo < 0 else torch.full_like(r, lo)
        his = r * hi if hi > 0 else torch.full_like(r, hi)
        scale, zero = self.spec.qparams(los, his)
        scale, zero = scale.double(), zero.double()
        q = torch.clamp(torch.round(c[None, :] / scale) + zero, self.spec.qmin, self.spec.qmax)
        err = ((q - zero) * scale - c[None, :]) ** 2
        return (err * n[None, :]).sum(1)


class EntropyObserver(_HistogramObserver):
    """TensorRT's entropy calibration: the threshold T on ``|x|`` whose clipped-and-quantized histogram has the
    smallest KL divergence from the original; the range is ``[max(min, -T), min(max, T)]``."""

    def __init__(self, spec: QuantSpec, layer: str = "tensor", bins: int = 2048):
        super().__init__(spec, layer, bins)

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        # Exact zeros (half of every ReLU output) are exact in any range, so they say nothing about the
        # threshold; left in, their spike is smeared by the merged bins and drives the threshold far too low.
        v = x.reshape(-1).abs()
        return v[v != 0]

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.spec.qmax - self.spec.qmin + 1
        # Signed data spends half of the levels on each side of zero.
        quant_bins = max(2, levels // 2 if self.data_min < 0 else levels)
        hist = self.hist.numpy()
        if quant_bins >= self.bins or not hist.any():
            t = self.hi
        else:
            t = float(self.edges()[kl_threshold_bin(hist, quant_bins)])
        return self._pair(max(self.data_min, -t), min(self.data_max, t))


def kl_threshold_bin(hist: np.ndarray, quant_bins: int) -> int:
    """TensorRT's search: the number of histogram bins ``i`` (>= ``quant_bins``) to keep so that
    KL(P || Q) is smallest, where P is the first ``i`` bins with the outliers folded into the last and Q is
    P squeezed into ``quant_bins`` levels and expanded back over P's non-empty bins."""
    bins = len(hist)
    hist = hist.astype(np.float64)
    tail = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # tail[i] = sum(hist[i:])

    def divergence(i: int) -> float:
        p = hist[:i].copy()
        p[-1] += tail[i]
        sliced = hist[:i]
        nonzero = sliced != 0
        idx = (np.arange(i) * quant_bins) // i
        qsum = np.bincount(idx, weights=sliced, minlength=quant_bins)
        qcnt = np.bincount(idx, weights=nonzero, minlength=quant_bins)
        q = np.where(nonzero, qsum[idx] / np.maximum(qcnt[idx], 1), 0.0)
        return _kl(p, q)

    # Coarse-to-fine: every `stride`-th candidate, then every candidate around the best one (~10x fewer
    # evaluations than TensorRT's exhaustive scan, same answer on smooth divergence curves).
    stride = max(1, (bins - quant_bins) // 128)
    coarse = list(range(quant_bins, bins + 1, stride))
    if coarse[-1] != bins:
        coarse.append(bins)
    best_i = min(coarse, key=divergence)
    fine = range(max(quant_bins, best_i - stride + 1), min(bins, best_i + stride - 1) + 1)
    return min(fine, key=divergence)


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    qs = q.sum()
    if qs <= 0:
        return math.inf
    q = q / qs
    p = p / max(p.sum(), _TINY)
    mask = p > 0
    # Q is zero where P has only the folded outliers: smooth it instead of returning inf.
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-10))))


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "entropy": EntropyObserver,
}


def make_observer(name: str, spec: QuantSpec, *, layer: str = "tensor", **options) -> Observer:
    """Build the observer called ``name`` for tensors quantized as ``spec``.

    ``options`` go to the observer (``averaging_constant`` for moving_average, ``percentile`` and ``bins``
    for percentile, ``bins``/``grid`` for mse, ``bins`` for entropy); ``layer`` names the tensor in errors.
    """
    check_choice("observer", name, tuple(OBSERVERS))
    cls = OBSERVERS[name]
    try:
        return cls(spec, layer, **options)
    except TypeError as exc:
        raise ConfigError(f"observer {name!r} does not take these options {sorted(options)}: {exc}") from None
