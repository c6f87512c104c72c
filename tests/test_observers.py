"""Calibration observers: ranges, integer ranges, round-trip error bounds, bad input."""

import math

import numpy as np
import pytest
import torch

from torchslim.core.errors import ConfigError, DataError
from torchslim.quantization.observers import OBSERVERS, kl_threshold_bin, make_observer
from torchslim.quantization.spec import QuantSpec

UINT8 = QuantSpec(bits=8, symmetric=False, signed=False)
INT8 = QuantSpec(bits=8, symmetric=True, signed=True)


def _heavy_tailed(n: int = 20000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.distributions.Laplace(0.0, 1.0).sample((n,))
    x[torch.randint(0, n, (5,), generator=g)] = 60.0  # a few outliers
    return x


def _mse(x: torch.Tensor, spec: QuantSpec, lo: float, hi: float) -> float:
    scale, zero = spec.qparams(torch.tensor(lo), torch.tensor(hi))
    return float(((spec.dequantize(spec.quantize(x, scale, zero), scale, zero) - x) ** 2).mean())


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("spec", [UINT8, INT8], ids=["uint8", "int8"])
def test_codes_stay_in_integer_range_and_in_range_values_round_trip(name, spec):
    torch.manual_seed(0)
    obs = make_observer(name, spec, layer="t")
    x = torch.randn(4096) * 3 + 0.5
    obs.update(x)
    obs.update(x * 0.8)
    scale, zero = obs.qparams()
    lo, hi = (float(v) for v in obs.range())
    q = spec.quantize(x, scale, zero)
    assert q.min() >= spec.qmin and q.max() <= spec.qmax
    assert spec.qmin <= int(zero.reshape(-1)[0]) <= spec.qmax
    assert float(x.min()) - 1e-6 <= lo <= 0.0 <= hi <= float(x.max()) + 1e-6
    inside = (x >= lo) & (x <= hi)
    err = (spec.dequantize(q, scale, zero) - x).abs()[inside]
    assert float(err.max()) <= float(scale.reshape(-1)[0]) / 2 + 1e-6  # round-to-nearest bound
    assert 0 <= math.fabs(float(spec.dequantize(torch.zeros(1, dtype=torch.int64) + zero.reshape(-1)[0], scale,
                                                 zero).reshape(-1)[0])) < 1e-7  # zero is exact


def test_minmax_tracks_extremes_and_moving_average_smooths():
    mm = make_observer("minmax", UINT8)
    ma = make_observer("moving_average", UINT8, averaging_constant=0.5)
    for obs in (mm, ma):
        obs.update(torch.tensor([-1.0, 2.0]))
        obs.update(torch.tensor([-3.0, 4.0]))
    assert [float(v) for v in mm.range()] == [-3.0, 4.0]
    assert [float(v) for v in ma.range()] == [-2.0, 3.0]  # halfway between the batches
    scale, zero = mm.qparams()
    assert float(scale) == pytest.approx(7.0 / 255)
    assert int(zero) == round(3.0 / (7.0 / 255))


def test_per_channel_minmax_gives_one_scale_per_channel():
    spec = QuantSpec(bits=8, symmetric=True, granularity="channel", axis=1)
    obs = make_observer("minmax", spec, layer="conv")
    x = torch.randn(8, 3, 5, 5) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    obs.update(x)
    scale, zero = obs.qparams()
    assert scale.shape == (1, 3, 1, 1)
    expected = x.abs().amax(dim=(0, 2, 3)) / 127
    assert torch.allclose(scale.reshape(-1), expected)
    assert torch.all(zero == 0)
    with pytest.raises(DataError, match="conv"):
        obs.update(torch.randn(8, 4, 5, 5))  # channel count changed between batches


def test_percentile_clips_outliers():
    x = _heavy_tailed()
    obs = make_observer("percentile", UINT8, percentile=99.9)
    obs.update(x)
    lo, hi = (float(v) for v in obs.range())
    assert hi < 20 and lo > -20  # the 60.0 outliers are clipped
    assert hi >= float(torch.quantile(x, 0.99)) and lo <= float(torch.quantile(x, 0.01))


def test_mse_observer_beats_minmax_on_heavy_tails_and_is_the_grid_optimum():
    # At 4 bits the MSE-optimal clipping of a Laplace distribution is about 5 scales (Banner et al., ACIQ).
    torch.manual_seed(0)
    spec = QuantSpec(bits=4, symmetric=False, signed=False)
    x = torch.distributions.Laplace(0.0, 1.0).sample((50000,))
    obs = make_observer("mse", spec)
    obs.update(x)
    lo, hi = (float(v) for v in obs.range())
    assert 3.0 < hi < 8.0
    assert _mse(x, spec, lo, hi) < 0.6 * _mse(x, spec, float(x.min()), float(x.max()))
    losses = obs.losses(obs.data_min, obs.data_max)
    best = int(torch.argmin(losses))
    assert float(losses[best]) <= float(losses[-1])  # never worse than no clipping (ratio 1 = min/max)
    assert hi == pytest.approx(obs.data_max * float(obs.ratios[best]), rel=1e-5)


def _kl_exhaustive(hist: np.ndarray, quant_bins: int) -> int:
    from torchslim.quantization.observers import _kl

    best, best_i = math.inf, len(hist)
    for i in range(quant_bins, len(hist) + 1):
        p = hist[:i].astype(np.float64).copy()
        p[-1] += hist[i:].sum()
        nz = hist[:i] != 0
        idx = (np.arange(i) * quant_bins) // i
        qs = np.bincount(idx, weights=hist[:i], minlength=quant_bins)
        qc = np.bincount(idx, weights=nz, minlength=quant_bins)
        q = np.where(nz, qs[idx] / np.maximum(qc[idx], 1), 0.0)
        kl = _kl(p, q)
        if kl < best:
            best, best_i = kl, i
    return best_i


def test_entropy_threshold_matches_exhaustive_search_and_clips_tails():
    x = _heavy_tailed().abs()
    hist = torch.histc(x, 512, 0, float(x.max())).double().numpy()
    assert abs(kl_threshold_bin(hist, 128) - _kl_exhaustive(hist, 128)) <= 4
    obs = make_observer("entropy", UINT8)
    obs.update(_heavy_tailed())
    lo, hi = (float(v) for v in obs.range())
    assert 1.0 < hi < 30.0 and lo == pytest.approx(-hi, rel=1e-6)


def test_histogram_grows_without_losing_counts():
    obs = make_observer("percentile", UINT8, bins=256)
    obs.update(torch.linspace(0, 1, 1000))
    obs.update(torch.linspace(-5, 5, 1000))  # wider range: re-binned
    assert float(obs.hist.sum()) == pytest.approx(2000)
    assert obs.lo <= -5 and obs.hi >= 5


def test_constant_data_is_flagged_and_still_gives_valid_qparams():
    obs = make_observer("minmax", UINT8)
    obs.update(torch.full((10,), 2.5))
    assert obs.is_constant
    scale, zero = obs.qparams()
    assert float(scale) > 0 and int(zero) == 0  # [0, 2.5]: zero stays exactly representable
    q = UINT8.quantize(torch.full((3,), 2.5), scale, zero)
    assert torch.allclose(UINT8.dequantize(q, scale, zero), torch.full((3,), 2.5))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_bad_input_names_the_layer(name):
    obs = make_observer(name, UINT8, layer="block3.conv")
    with pytest.raises(DataError, match="block3.conv.*never updated"):
        obs.qparams()
    with pytest.raises(DataError, match="block3.conv.*NaN"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(DataError, match="block3.conv.*empty"):
        obs.update(torch.empty(0))


def test_config_errors():
    with pytest.raises(ConfigError, match="observer"):
        make_observer("kmeans", UINT8)
    with pytest.raises(ConfigError, match="per tensor"):
        make_observer("entropy", QuantSpec(granularity="channel"))
    with pytest.raises(ConfigError, match="percentile"):
        make_observer("percentile", UINT8, percentile=30)
    with pytest.raises(ConfigError, match="options"):
        make_observer("minmax", UINT8, percentile=99.0)
