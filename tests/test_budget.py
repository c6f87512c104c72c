"""Budget decisions with the sampling error of the split: the paired accuracy bound, the paired bootstrap, the
judge, and the search's choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchslim.core.errors import ConfigError
from torchslim.metrics import evaluate
from torchslim.metrics.significance import (
    Judge,
    accuracy_drop_bound,
    bootstrap_drop_bound,
    samples_needed,
    smallest_certifiable_drop,
)
from torchslim.search.pareto import choose


def test_paired_bound_covers_the_true_drop_at_its_confidence():
    # Simulated paired splits: the baseline is right on 97%, the model loses 2% of those and wins 1% back, so
    # the true drop is 1 point. The one-sided 90% bound must lie above it in about 90% of splits.
    rng = np.random.default_rng(0)
    for n in (200, 1000):
        worse = rng.binomial(n, 0.02, size=2000)
        better = rng.binomial(n - worse, 0.01 / 0.98)
        bounds = np.array([accuracy_drop_bound(int(w), int(b), n, 0.9) for w, b in zip(worse, better)])
        coverage = float((bounds >= 0.01).mean())
        assert 0.86 <= coverage <= 0.97, (n, coverage)


def test_paired_bound_shrinks_with_samples_and_never_certifies_below_the_split_resolution():
    assert accuracy_drop_bound(0, 0, 216) > 0.005  # the README example's 216 val images cannot certify 0.5 pt
    assert smallest_certifiable_drop(216) == pytest.approx(accuracy_drop_bound(0, 0, 216))
    assert smallest_certifiable_drop(5000) < 0.0005
    # Same disagreement rates, more samples: a tighter bound, always above the observed drop.
    small, large = accuracy_drop_bound(6, 2, 400), accuracy_drop_bound(60, 20, 4000)
    assert large < small and large > 40 / 4000
    assert accuracy_drop_bound(2, 6, 400) < accuracy_drop_bound(6, 2, 400)
    # More disagreement at the same net drop: a wider bound.
    assert accuracy_drop_bound(20, 16, 1000) > accuracy_drop_bound(4, 0, 1000)
    assert samples_needed(0.005) > 500 > samples_needed(0.02)
    assert samples_needed(0.005, holdout=300) is None and samples_needed(0.01, holdout=10_000) > samples_needed(0.01)
    with pytest.raises(ConfigError, match="confidence"):
        accuracy_drop_bound(1, 0, 100, confidence=1.0)


def test_paired_bootstrap_bound_tracks_the_spread_of_the_batches():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.8, 0.9, size=40)
    tight = bootstrap_drop_bound(base, base - 0.01 + rng.normal(0, 0.001, 40))
    loose = bootstrap_drop_bound(base, base - 0.01 + rng.normal(0, 0.05, 40))
    assert 0.01 < tight < 0.0115 and loose > tight + 0.005
    assert bootstrap_drop_bound(base, base - 0.01, confidence=0.99) == pytest.approx(0.01)


def _split(n: int = 300, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=25)


class Threshold(nn.Module):
    """Predicts class 1 when x0 > t: t = 0 is right on every sample, other t flip the samples in between."""

    def __init__(self, t: float):
        super().__init__()
        self.t = nn.Parameter(torch.tensor(float(t)))

    def forward(self, x):
        s = x[:, :1] - self.t
        return torch.cat([-s, s], 1)


def test_judge_counts_the_samples_where_the_two_models_differ():
    loader = _split()
    judge = Judge(Threshold(0.0), loader, max_drop=0.05)
    assert judge.baseline_value == 1.0 and judge.n == 300
    x0 = torch.cat([b[0][:, 0] for b in loader])
    rec = judge.paired(Threshold(0.1))
    assert rec["worse"] == int(((x0 > 0) & (x0 <= 0.1)).sum()) and rec["better"] == 0
    a = judge.assess(rec)
    assert a["drop"] == pytest.approx(rec["worse"] / 300)
    assert a["drop_bound"] > a["drop"] and a["certified"] == pytest.approx(1 - a["drop_bound"])
    assert a["met"] is (a["drop_bound"] <= 0.05)
    # The same model under a budget its point estimate meets but the bound does not.
    tight = Judge(Threshold(0.0), loader, max_drop=a["drop"] + 1e-6)
    assert tight.assess(tight.paired(Threshold(0.1)))["met"] is False
    assert "samples" in Judge(Threshold(0.0), loader, max_drop=0.005).resolution()["warning"]


def test_judge_bootstraps_a_user_metric_over_batches_and_says_when_it_cannot():
    def metric(model, loader):  # a user metric: accuracy computed its own way
        return evaluate(model, loader)

    loader = _split()
    judge = Judge(Threshold(0.0), loader, max_drop=0.05, metric_fn=metric)
    a = judge.assess(judge.paired(Threshold(0.1)))
    assert a["method"].startswith("paired bootstrap") and a["drop_bound"] >= a["drop"] > 0
    few = DataLoader(loader.dataset, batch_size=100)
    j = Judge(Threshold(0.0), few, max_drop=0.05, metric_fn=metric)
    assert j.assess(j.paired(Threshold(0.1)))["drop_bound"] is None
    assert "too few to bootstrap" in j.resolution()["warning"]


def test_the_search_chooses_by_the_certified_value_not_the_point_estimate():
    points = [{"trial": 0, "metric": 0.98, "certified": 0.96, "objective": 100.0},
              {"trial": 1, "metric": 0.975, "certified": 0.971, "objective": 200.0},
              {"trial": 2, "metric": 0.99, "certified": 0.985, "objective": 900.0}]
    chosen, feasible = choose(points, floor=0.97)
    assert feasible and chosen["trial"] == 1
    chosen, feasible = choose(points, floor=0.99)
    assert not feasible and chosen["trial"] == 2


def test_a_rerun_that_differs_names_the_unseeded_training_loader():
    from torchslim.search.api import _rerun_cause

    ds = _split().dataset
    assert "without its own generator" in _rerun_cause(DataLoader(ds, shuffle=True))
    seeded = DataLoader(ds, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert "kernels" in _rerun_cause(seeded)
    assert "num_workers=2" in _rerun_cause(DataLoader(ds, num_workers=2))


def test_with_a_holdout_the_bound_predicts_the_drop_the_test_split_will_show():
    # Val and test drawn from the same paired population: the test split's measured drop must stay under the
    # val-based prediction bound in about 90% of draws (the plain bound covers the true drop only).
    rng = np.random.default_rng(2)
    n, h, trials = 700, 350, 2000
    p = [0.02, 0.01, 0.97]  # worse, better, agree
    val = rng.multinomial(n, p, size=trials)
    test = rng.multinomial(h, p, size=trials)
    test_drop = (test[:, 0] - test[:, 1]) / h
    pred = np.array([accuracy_drop_bound(int(w), int(b), n, 0.9, holdout=h) for w, b, _ in val])
    plain = np.array([accuracy_drop_bound(int(w), int(b), n, 0.9) for w, b, _ in val])
    assert 0.86 <= float((test_drop <= pred).mean()) <= 0.96
    assert float((test_drop <= plain).mean()) < 0.85 and (pred > plain).all()
