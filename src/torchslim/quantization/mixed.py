"""Mixed precision: per-layer weight bit widths from a sensitivity measurement and a budget.

1. Sensitivity: for every quantizable layer and every candidate bit width, quantize only that layer's
   weights (fake quantization, the quantizer QAT would start from) and measure the damage on a few
   batches -- the drop in accuracy, or the output error ``||f_q(x) - f(x)||^2 / ||f(x)||^2``.
2. Allocation: choose one bit width per layer minimising the summed sensitivity subject to the budget.
   Summing per-layer damages assumes the layers' errors add up independently, the usual first-order
   assumption (HAWQ-V3 and others make it too). The choice is a multiple-choice knapsack, solved
   exactly by dynamic programming over the cost discretised into ``_UNITS`` steps (costs rounded up, so
   the plan never exceeds the budget).
3. Quantize with the plan: prepare, optionally fine-tune (QAT), convert.

Budgets are fractions of the float32 model: ``objective="size"`` counts weight bits (every parameter
that is not a quantized weight -- biases, norms, excluded layers -- stays at 32 bits);
``objective="bops"`` counts bit operations, MACs x weight bits x activation bits, the usual latency proxy
for low-bit accelerators. (Measured latency is no use here: the portable execution path dequantizes, so
its speed does not depend on the bit width.)
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.config import Config
from ..core.checks import check_choice, check_fraction, check_positive
from ..data import check_loader
from ..data.batches import call_model, output_tensor, split_batch, to_device
from ..core.errors import ConfigError, DataError
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from ..training.train import TrainConfig
from .modules import to_qat_module
from .qat import (
    _UNSUPPORTED_CHOICES,
    ACTIVATION_BITS,
    WEIGHT_BITS,
    LayerQuant,
    _check_patterns,
    calibrate,
    check_bits,
    convert,
    copy_model,
    prepare,
    quantizable_layers,
    run_qat,
)

__all__ = ["MixedPrecision", "MixedPrecisionPlan", "measure_sensitivity", "allocate_bits",
           "mixed_precision_plan", "quantize_mixed", "apply_mixed_precision"]

_UNITS = 4000


@dataclasses.dataclass(frozen=True)
class MixedPrecision(Config):
    """Per-layer weight bit widths chosen from ``candidate_bits`` to fit ``budget``.

    ``budget``: the fraction of the float32 model's ``objective`` (``size``: bits of the parameters;
    ``bops``: MACs x weight bits x activation bits) the quantized model may use, e.g. 0.15.
    ``metric``: ``output_error`` (relative squared error of the outputs, needs no labels) or
    ``accuracy`` (drop in top-1 accuracy, or in the ``metric`` function passed to ``quantize``), measured on
    ``sensitivity_batches`` batches.
    ``activation_bits`` quantizes layer inputs too (same width everywhere). ``finetune``: QAT after the
    allocation (None: convert right away, i.e. post-training). Weights are per channel and symmetric,
    with a learned step (LSQ) when ``learned_step``.
    """

    budget: float = 0.15
    objective: str = "size"
    candidate_bits: tuple[int, ...] = (2, 4, 8)
    metric: str = "output_error"
    activation_bits: int | None = None
    learned_step: bool = True
    sensitivity_batches: int = 4
    exclude: tuple[str, ...] = ()
    unsupported: str = "warn"
    calibration_batches: int = 8
    finetune: TrainConfig | None = TrainConfig(epochs=1.0, lr=1e-4)

    def validate(self) -> None:
        check_fraction("budget", self.budget, allow_zero=False, allow_one=True)
        check_choice("objective", self.objective, ("size", "bops"))
        if not isinstance(self.candidate_bits, tuple) or not self.candidate_bits:
            raise ConfigError(f"candidate_bits must be a non-empty tuple of bit widths, got {self.candidate_bits!r}")
        for b in self.candidate_bits:
            check_bits("candidate_bits entry", b, WEIGHT_BITS, hint="binary/ternary layers are not mixed in")
        if len(set(self.candidate_bits)) != len(self.candidate_bits):
            raise ConfigError(f"candidate_bits has duplicates: {self.candidate_bits}")
        check_choice("metric", self.metric, ("output_error", "accuracy"))
        check_bits("activation_bits", self.activation_bits, ACTIVATION_BITS, optional=True)
        check_positive("sensitivity_batches", self.sensitivity_batches, integer=True)
        _check_patterns("exclude", self.exclude)
        check_choice("unsupported", self.unsupported, _UNSUPPORTED_CHOICES)
        check_positive("calibration_batches", self.calibration_batches, integer=True)
        if self.finetune is not None and not isinstance(self.finetune, TrainConfig):
            raise ConfigError(f"finetune must be a TrainConfig or None, got {type(self.finetune).__name__}")

    def layer(self, bits: int) -> LayerQuant:
        return LayerQuant(bits=bits, learned_step=self.learned_step, activation_bits=self.activation_bits)


@dataclasses.dataclass
class MixedPrecisionPlan:
    """The allocation: bits per layer, the sensitivities it came from and the cost it reaches."""

    bits: dict[str, int]
    sensitivity: dict[str, dict[int, float]]
    weights: dict[str, int]
    macs: dict[str, int]
    objective: str
    budget: float
    fraction: float  # cost of the plan / cost of the float32 model

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sensitivity"] = {n: {str(b): v for b, v in s.items()} for n, s in self.sensitivity.items()}
        return out


def _batches(loader, n: int) -> list:
    """The first ``n`` batches of ``loader``, as it yields them."""
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append(batch)
    return out


@torch.no_grad()
def _macs_per_sample(model: nn.Module, layers: dict[str, nn.Module], inputs) -> dict[str, int]:
    macs: dict[str, int] = {}
    hooks = []
    for name, m in layers.items():
        def hook(mod, inp, out, name=name):
            per_out = mod.weight[0].numel()  # in_features, or in_channels/groups * prod(kernel)
            macs[name] = int(out.numel() // out.shape[0] * per_out)
        hooks.append(m.register_forward_hook(hook))
    try:
        call_model(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return macs


def _damage(out: torch.Tensor, ref: torch.Tensor, y: torch.Tensor | None, metric: str) -> tuple[float, float]:
    """(numerator, denominator) summed over batches."""
    if metric == "accuracy":
        if y is None:
            raise DataError("metric='accuracy' needs labelled batches (inputs, targets); use metric='output_error'")
        ref_correct = (ref.argmax(1) == y).sum().item()
        return ref_correct - (out.argmax(1) == y).sum().item(), y.numel()
    return F.mse_loss(out.float(), ref.float(), reduction="sum").item(), ref.float().pow(2).sum().item()


@torch.no_grad()
def measure_sensitivity(model: nn.Module, config: MixedPrecision, data, metric: Metric | None = None
                        ) -> tuple[dict[str, dict[int, float]], dict[str, nn.Module]]:
    """{layer: {bits: damage}} from quantizing one layer's weights at a time; also the layers measured.
    With ``config.metric="accuracy"`` and a ``metric(model, loader)`` function, the damage is the drop in
    ``metric`` on the sensitivity batches (as a list of batches)."""
    check_loader(data, "sensitivity data")
    work = copy_model(model).eval()
    layers = quantizable_layers(work, config.exclude, config.unsupported, "MixedPrecision.exclude")
    if not layers:
        raise ConfigError(f"{type(model).__name__}: no quantizable layer (Linear/Conv1d/Conv2d) after exclude")
    device = next((p.device for p in work.parameters()), torch.device("cpu"))
    raw = [to_device(b, device) for b in _batches(data, config.sensitivity_batches)]
    batches = [split_batch(b) for b in raw]
    refs = [output_tensor(call_model(work, x)) for x, _ in batches]
    for r in refs:
        if not torch.isfinite(r).all():
            raise DataError("the float model's outputs on the sensitivity data contain NaN/inf; check the data")
    use_metric = metric is not None and config.metric == "accuracy"
    base = float(metric(work, raw)) if use_metric else 0.0
    sens: dict[str, dict[int, float]] = {}
    total = len(layers) * len(config.candidate_bits)
    bar = tqdm(total=total, desc="sensitivity", leave=False, dynamic_ncols=True)
    for name, layer in layers.items():
        sens[name] = {}
        for bits in config.candidate_bits:
            lq = dataclasses.replace(config.layer(bits), activation_bits=None)  # weights only: isolate this layer
            work.set_submodule(name, to_qat_module(copy.deepcopy(layer), lq.weight_quantizer(layer, name), None))
            if use_metric:
                sens[name][bits] = base - float(metric(work, raw))
            else:
                num = den = 0.0
                for (x, y), ref in zip(batches, refs):
                    a, b = _damage(output_tensor(call_model(work, x)), ref, y, config.metric)
                    num, den = num + a, den + b
                sens[name][bits] = num / max(den, 1e-30)
            bar.update(1)
        work.set_submodule(name, layer)
    bar.close()
    return sens, layers


def allocate_bits(sensitivity: dict[str, dict[int, float]], cost: dict[str, dict[int, float]],
                  capacity: float) -> dict[str, int]:
    """Bits per layer minimising the summed sensitivity with the summed cost <= ``capacity``.

    Exact multiple-choice knapsack by dynamic programming; costs are rounded up to ``capacity/_UNITS``
    steps so that a returned plan always fits. Among equally sensitive plans the one using more of the
    budget wins (higher precision for free). Raises ConfigError when even the cheapest plan does not fit.
    """
    names = list(sensitivity)
    cheapest = sum(min(cost[n].values()) for n in names)
    if cheapest > capacity * (1 + 1e-9):
        raise ConfigError(f"the budget cannot be met: even every layer at its lowest candidate width costs "
                          f"{cheapest:.4g} > {capacity:.4g} available; raise the budget or add lower candidate bits")
    unit = capacity / _UNITS if capacity > 0 else 1.0
    units = {n: {b: math.ceil(c / unit - 1e-9) for b, c in cost[n].items()} for n in names}
    best = np.full(_UNITS + 1, np.inf)  # best[c]: least damage spending exactly c units
    best[0] = 0.0
    picks: list[np.ndarray] = []
    for n in names:
        nxt = np.full(_UNITS + 1, np.inf)
        pick = np.full(_UNITS + 1, -1, dtype=np.int64)
        for bits, s in sensitivity[n].items():
            c = units[n][bits]
            if c > _UNITS:
                continue
            cand = np.full(_UNITS + 1, np.inf)
            cand[c:] = best[:_UNITS + 1 - c] + s - 1e-12 * c  # tie-break towards spending the budget
            better = cand < nxt
            nxt[better], pick[better] = cand[better], bits
        best = nxt
        picks.append(pick)
    if not np.isfinite(best).any():
        # Rounding costs up made the exact optimum infeasible; fall back to the cheapest widths.
        return {n: min(cost[n], key=lambda b: cost[n][b]) for n in names}
    end = int(np.argmin(best))
    plan: dict[str, int] = {}
    for n, pick in zip(reversed(names), reversed(picks)):
        bits = int(pick[end])
        plan[n] = bits
        end -= units[n][bits]
    return {n: plan[n] for n in names}


def mixed_precision_plan(model: nn.Module, config: MixedPrecision, data, metric: Metric | None = None
                         ) -> MixedPrecisionPlan:
    """Measure per-layer sensitivity on ``data`` (with ``metric``, see :func:`measure_sensitivity`) and
    allocate bit widths within ``config.budget``."""
    sens, layers = measure_sensitivity(model, config, data, metric)
    x = to_device(split_batch(_batches(data, 1)[0])[0], next((p.device for p in model.parameters()),
                                                             torch.device("cpu")))
    work = copy_model(model).eval()
    macs = _macs_per_sample(work, {n: work.get_submodule(n) for n in layers}, x)
    weights = {n: m.weight.numel() for n, m in layers.items()}
    abits = config.activation_bits or 32
    if config.objective == "size":
        total = 32.0 * sum(p.numel() for p in model.parameters())
        fixed = total - 32.0 * sum(weights.values())  # biases, norms, excluded layers stay float32
        cost = {n: {b: float(weights[n] * b) for b in config.candidate_bits} for n in layers}
    else:
        total = 32.0 * 32.0 * sum(macs.values())
        fixed = 0.0
        cost = {n: {b: float(macs[n] * b * abits) for b in config.candidate_bits} for n in layers}
    capacity = config.budget * total - fixed
    if capacity <= 0:
        raise ConfigError(f"budget={config.budget} is below the float parameters that are never quantized "
                          f"({fixed / total:.3f} of the model): raise the budget")
    bits = allocate_bits(sens, cost, capacity)
    used = fixed + sum(cost[n][b] for n, b in bits.items())
    return MixedPrecisionPlan(bits=bits, sensitivity=sens, weights=weights, macs=macs, objective=config.objective,
                              budget=config.budget, fraction=used / total)


def quantize_mixed(model: nn.Module, config: MixedPrecision, *, data=None, val_data=None,
                   calibration_data=None, loss_fn: LossFn | str | None = None, metric: Metric | None = None,
                   inplace: bool = False) -> tuple[nn.Module, MixedPrecisionPlan]:
    """Plan (sensitivity on ``calibration_data``, else ``val_data``, else ``data``, with ``metric``), prepare
    ``model`` (a copy unless ``inplace``), fine-tune on ``data`` with ``loss_fn`` when ``config.finetune`` is
    set, convert. Returns ``(converted model, plan)``."""
    if not isinstance(config, MixedPrecision):
        raise ConfigError(f"expected a MixedPrecision config, got {type(config).__name__}")
    sens_data = next((d for d in (calibration_data, val_data, data) if d is not None), None)
    if sens_data is None:
        raise DataError("mixed precision measures layer sensitivity on data: pass data= (or val_data=, or "
                        "calibration_data= to the internal quantize_mixed)")
    if config.finetune is not None and data is None:
        raise DataError("MixedPrecision.finetune trains after the allocation: pass data= (a training loader) or "
                        "set finetune=None")
    plan = mixed_precision_plan(model, config, sens_data, metric)
    prepared = prepare(model, {n: config.layer(b) for n, b in plan.bits.items()}, inplace=inplace)
    calib = calibration_data if calibration_data is not None else sens_data
    if config.activation_bits is not None:
        calibrate(prepared, calib, config.calibration_batches)
    if config.finetune is not None:
        return run_qat(prepared, config.finetune, data, val_data, loss_fn=loss_fn, metric=metric), plan
    return convert(prepared, inplace=True), plan


def apply_mixed_precision(model: nn.Module, config: MixedPrecision, *, data=None, val_data=None,
                          calibration_data=None, **training) -> nn.Module:
    """Mixed-precision quantization of ``model``; returns the converted model (:func:`quantize_mixed`, whose
    ``loss_fn``, ``metric`` and ``inplace`` ``training`` passes on, also returns the plan)."""
    return quantize_mixed(model, config, data=data, val_data=val_data, calibration_data=calibration_data,
                          **training)[0]
