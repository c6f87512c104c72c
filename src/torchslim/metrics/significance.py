"""Is a compressed model within budget, given the sampling error of the split it is measured on?

The drop ``baseline - model`` is measured on the same samples for both models, so it is a *paired* difference:
only the samples on which the two disagree carry information. For top-1 accuracy the decision uses an upper
confidence bound on the drop from the Agresti-Min adjusted Wald interval for paired proportions (half a count
added to each cell of the 2x2 agreement table; it keeps near nominal coverage when disagreements are few,
where the plain Wald interval has zero width). For any other metric it uses a paired bootstrap over the split's
batches (the metric evaluated per batch), which needs enough batches to resample.

A model is *certified* within budget when the upper bound is <= ``max_drop``. The default confidence is 0.9
(one-sided): a search compares several settings on one split and keeps the smallest that passes, so the bound
must leave room for that selection and for the test split's own noise, while a higher confidence on a split of a
few hundred samples would certify nothing but the baseline itself.
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..core.errors import ConfigError, DataError
from ..data import check_loader
from ..data.batches import batch_size, call_model, output_tensor, split_batch, to_device
from .evaluate import evaluate, model_device

__all__ = ["DEFAULT_CONFIDENCE", "Judge", "accuracy_drop_bound", "bootstrap_drop_bound", "smallest_certifiable_drop",
           "samples_needed", "correct_mask", "count_samples"]

DEFAULT_CONFIDENCE = 0.9
# The share of samples whose prediction a typical compressed model changes (in either direction); used only to
# say how large a split a budget needs.
TYPICAL_DISAGREEMENT = 0.01
MIN_BATCHES = 8


def _z(confidence: float) -> float:
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be in [0.5, 1), got {confidence!r} (e.g. 0.9)")
    return NormalDist().inv_cdf(confidence)


def accuracy_drop_bound(worse: int, better: int, n: int, confidence: float = DEFAULT_CONFIDENCE,
                        holdout: int | None = None) -> float:
    """One-sided upper bound on the true accuracy drop from ``n`` paired samples: ``worse`` the baseline got
    right and the model wrong, ``better`` the reverse (Agresti-Min adjusted Wald).

    With ``holdout`` (the size of a split measured later, e.g. test), the bound is a prediction bound for the drop
    that split will show: its own sampling variance is added, so that the budget also holds there."""
    if n <= 0:
        raise DataError("no samples to judge the budget on: the validation split is empty")
    m = n + 2
    p10, p01 = (worse + 0.5) / m, (better + 0.5) / m
    d = p10 - p01
    var = max(p10 + p01 - d * d, 0.0)
    scale = 1 / m + (1 / holdout if holdout else 0.0)
    return d + _z(confidence) * math.sqrt(var * scale)


def smallest_certifiable_drop(n: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """The bound of a model that agrees with the baseline on every one of ``n`` samples: no smaller budget can
    ever be certified on that split."""
    return accuracy_drop_bound(0, 0, n, confidence)


def samples_needed(max_drop: float, confidence: float = DEFAULT_CONFIDENCE,
                   disagreement: float = TYPICAL_DISAGREEMENT, holdout: int | None = None) -> int | None:
    """About how many samples certify a model with no net drop that changes ``disagreement`` of predictions
    (None: none suffice, because the ``holdout`` split alone is too small to show the budget)."""
    room = (max_drop / _z(confidence)) ** 2 / disagreement - (1 / holdout if holdout else 0.0)
    return int(math.ceil(1 / room)) if room > 0 else None


def bootstrap_drop_bound(baseline: Sequence[float], model: Sequence[float], weights: Sequence[float] | None = None,
                         confidence: float = DEFAULT_CONFIDENCE, resamples: int = 2000, seed: int = 0,
                         holdout_ratio: float = 0.0) -> float:
    """Paired bootstrap upper bound on the drop of a per-batch metric: batches are resampled with replacement and
    the ``confidence`` quantile of the (weighted) mean of ``baseline - model`` is returned. ``holdout_ratio``
    (samples here / samples of a split measured later) widens the spread around the mean by
    ``sqrt(1 + ratio)``: a prediction bound for that split."""
    b, c = np.asarray(baseline, dtype=float), np.asarray(model, dtype=float)
    if b.shape != c.shape or b.ndim != 1 or len(b) == 0:
        raise DataError(f"paired bootstrap needs one score per batch for both models, got {b.shape} and {c.shape}")
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(b), size=(resamples, len(b)))
    diffs = ((b - c)[idx] * w[idx]).sum(1) / w[idx].sum(1)
    mean = float(((b - c) * w).sum() / w.sum())
    return mean + math.sqrt(1 + holdout_ratio) * (float(np.quantile(diffs, confidence)) - mean)


@torch.no_grad()
def count_samples(loader) -> int:
    """Samples in ``loader``: ``len(loader.dataset)`` when it has one, else counted batch by batch."""
    dataset = getattr(loader, "dataset", None)
    try:
        return len(dataset)
    except TypeError:
        return sum(_batch_len(b) for b in loader)


@torch.no_grad()
def correct_mask(model: nn.Module, loader) -> torch.Tensor:
    """Per-sample top-1 correctness (bool, in loader order) of ``model`` on ``loader``'s labelled batches."""
    check_loader(loader, "evaluation loader")
    device, was_training = model_device(model), model.training
    model.eval()
    out = []
    try:
        for batch in loader:
            inputs, y = split_batch(batch)
            if y is None:
                raise DataError("top-1 accuracy needs labelled batches; pass metric= for unlabelled data")
            logits = output_tensor(call_model(model, to_device(inputs, device)))
            out.append(logits.argmax(1).cpu() == y.reshape(-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


@dataclasses.dataclass
class Judge:
    """Judges models against ``baseline`` on ``loader`` (the validation split) under ``max_drop``.

    ``metric_fn`` is the metric (None or :func:`~torchslim.metrics.evaluate`: top-1 accuracy, judged per
    sample); other metrics are judged by a paired bootstrap over batches, evaluating ``metric_fn(model, [batch])``
    per batch. ``paired(model)`` returns a small JSON-able record (stored with search trials) and
    ``assess(record)`` the decision. ``holdout``: the number of samples of the split measured afterwards (the
    test split): the bound then predicts the drop that split will show, so a certified model meets the budget
    there too with about ``confidence`` probability (None: a bound on the true drop only)."""

    baseline: nn.Module
    loader: Any
    max_drop: float
    metric_fn: Callable[[nn.Module, Any], float] | None = None
    confidence: float = DEFAULT_CONFIDENCE
    holdout: int | None = None

    def __post_init__(self) -> None:
        _z(self.confidence)
        self.per_sample = self.metric_fn is None or self.metric_fn is evaluate
        self._base = self._scores(self.baseline)
        self.baseline_value = self._value(self._base)
        self.n = len(self._base["correct"]) if self.per_sample else int(sum(self._base["weights"]))

    def _scores(self, model: nn.Module) -> dict[str, Any]:
        if self.per_sample:
            return {"correct": correct_mask(model, self.loader)}
        batches = list(self.loader)
        scores = [float(self.metric_fn(model, [b])) for b in batches]
        weights = [float(_batch_len(b)) for b in batches]
        return {"scores": scores, "weights": weights, "value": float(self.metric_fn(model, self.loader))}

    def _value(self, s: dict[str, Any]) -> float:
        return float(s["correct"].float().mean()) if self.per_sample else s["value"]

    def paired(self, model: nn.Module) -> dict[str, Any]:
        """The model's value on the split and what the bound needs: counts of samples it gets wrong where the
        baseline is right (``worse``) and the reverse (``better``), or its per-batch scores."""
        s = self._scores(model)
        if self.per_sample:
            base = self._base["correct"]
            if len(s["correct"]) != len(base):
                raise DataError(f"the validation split yielded {len(s['correct'])} samples, {len(base)} for the "
                                "baseline: it must give the same samples in the same order every time")
            return {"value": self._value(s), "n": len(base), "worse": int((base & ~s["correct"]).sum()),
                    "better": int((~base & s["correct"]).sum())}
        return {"value": s["value"], "n": self.n, "scores": s["scores"], "weights": s["weights"]}

    def assess(self, rec: dict[str, Any]) -> dict[str, Any]:
        """``rec`` (from :meth:`paired`) judged: ``value``, ``drop``, ``drop_bound`` (None when the split has too
        few batches for a bootstrap), ``certified`` (baseline minus the bound: the value decisions compare with
        the floor), ``met``, ``n`` and ``method``."""
        drop = self.baseline_value - rec["value"]
        if "worse" in rec:
            bound = accuracy_drop_bound(rec["worse"], rec["better"], rec["n"], self.confidence, self.holdout)
            method = "paired accuracy bound (Agresti-Min)"
        elif len(rec["scores"]) >= MIN_BATCHES:
            ratio = rec["n"] / self.holdout if self.holdout else 0.0
            bound = bootstrap_drop_bound(self._base["scores"], rec["scores"], rec["weights"], self.confidence,
                                         holdout_ratio=ratio)
            method = "paired bootstrap over batches"
        else:
            bound, method = None, f"point estimate (fewer than {MIN_BATCHES} batches to bootstrap)"
        if bound is not None and self.holdout:
            method += f", predicting the drop on {self.holdout:,} test samples"
        judged = drop if bound is None else max(bound, drop)
        return {"value": rec["value"], "drop": drop, "drop_bound": bound, "certified": self.baseline_value - judged,
                "met": judged <= self.max_drop + 1e-12, "n": rec["n"], "method": method,
                "confidence": self.confidence}

    def resolution(self) -> dict[str, Any]:
        """What this split can resolve: the smallest certifiable drop, the samples a budget of ``max_drop``
        needs for a typical compressed model, and a warning when the split is too small for the budget."""
        floor = accuracy_drop_bound(0, 0, self.n, self.confidence, self.holdout)
        need = samples_needed(self.max_drop, self.confidence, holdout=self.holdout) if self.max_drop > 0 else None
        warning = None
        typical = f"a model that changes {TYPICAL_DISAGREEMENT:.0%} of predictions"
        if self.per_sample and self.max_drop > 0 and (need is None or self.n < need):
            warning = (f"the validation split has {self.n:,} samples: at {self.confidence:.0%} confidence no drop "
                       f"below {100 * floor:.2f} points can be certified (even for a model agreeing on every sample)"
                       + (f", and a {100 * self.max_drop:.2f}-point budget needs about {need:,} samples for {typical}"
                          if need is not None else
                          f", and with {self.holdout:,} test samples no validation split certifies a "
                          f"{100 * self.max_drop:.2f}-point budget for {typical}")
                       + "; use larger splits or a looser budget")
        elif not self.per_sample and len(self._base["scores"]) < MIN_BATCHES:
            warning = (f"the validation split has {len(self._base['scores'])} batches: too few to bootstrap the "
                       f"sampling error of the metric; the budget is judged on the point estimate (use at least "
                       f"{MIN_BATCHES} batches)")
        return {"n": self.n, "confidence": self.confidence, "smallest_certifiable_drop": floor,
                "samples_needed": need, "warning": warning}


def _batch_len(batch: Any) -> int:
    inputs, y = split_batch(batch)
    # A target that is not one tensor (e.g. the second sentence of a pair) does not give the batch size.
    return int(y.shape[0]) if torch.is_tensor(y) and y.ndim else batch_size(inputs)
