"""Binary and ternary weights, trained with straight-through estimators.

- :class:`BinaryWeights`: ``alpha * sign(w)``, ``alpha`` = mean |w| per output channel (BWN, the weight
  half of XNOR-Net; Rastegari et al. 2016). 1 bit per weight on disk.
- :class:`TernaryWeights`: ``alpha * t``, ``t`` in {-1, 0, +1} with threshold ``0.7 * mean|w|`` (TWN, Li et
  al. 2016), ``alpha`` closed-form or learned. 1.6 bits per weight on disk (five codes per byte).

The first and last layers are the most sensitive (few weights, and they see the raw input / produce
the logits), so by default they stay at ``first_last_bits`` (8-bit uniform) -- or float with None.
Both are QAT under the hood: ``prepare_qat(model, config)`` / ``convert`` work with these configs too.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from ..core.config import Config
from ..core.checks import check_choice, check_positive
from ..core.errors import ConfigError
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from ..training.train import TrainConfig
from .qat import (
    _UNSUPPORTED_CHOICES,
    ACTIVATION_BITS,
    WEIGHT_BITS,
    LayerQuant,
    _check_patterns,
    check_bits,
    first_last,
    prepare_qat,
    quantizable_layers,
    run_qat,
)

__all__ = ["BinaryWeights", "TernaryWeights", "apply_binary", "apply_ternary", "apply_lowbit"]


@dataclasses.dataclass(frozen=True)
class _LowBit:
    """Fields shared by the binary and ternary configs (not a Config itself, so recipes never name it)."""

    keep_first_last: bool = True
    first_last_bits: int | None = 8
    activation_bits: int | None = None
    exclude: tuple[str, ...] = ()
    unsupported: str = "warn"
    calibration_batches: int = 8
    train: TrainConfig = TrainConfig(epochs=2.0, lr=1e-3)

    def validate(self) -> None:
        check_bits("first_last_bits", self.first_last_bits, WEIGHT_BITS, optional=True)
        check_bits("activation_bits", self.activation_bits, ACTIVATION_BITS, optional=True)
        _check_patterns("exclude", self.exclude)
        check_choice("unsupported", self.unsupported, _UNSUPPORTED_CHOICES)
        check_positive("calibration_batches", self.calibration_batches, integer=True)
        if not isinstance(self.train, TrainConfig):
            raise ConfigError(f"train must be a TrainConfig, got {type(self.train).__name__}")

    def _layer(self) -> LayerQuant:
        raise NotImplementedError

    def layer_plan(self, model: nn.Module) -> dict[str, LayerQuant]:
        """{layer name: LayerQuant} for the layers of ``model`` this config quantizes."""
        names = list(quantizable_layers(model, self.exclude, self.unsupported, f"{type(self).__name__}.exclude"))
        plan = {n: self._layer() for n in names}
        if self.keep_first_last:
            for n in first_last(names):
                if self.first_last_bits is None:
                    plan.pop(n)
                else:
                    plan[n] = LayerQuant(bits=self.first_last_bits, activation_bits=self.activation_bits)
        return plan


@dataclasses.dataclass(frozen=True)
class BinaryWeights(_LowBit, Config):
    """Binary weights ``alpha * sign(w)`` with a per-output-channel ``alpha`` (BWN / XNOR-Net weights).

    ``keep_first_last``: the first and last quantizable layers stay at ``first_last_bits`` (uniform,
    per channel; None keeps them in float). ``activation_bits`` optionally quantizes layer inputs.
    ``train`` is the fine-tuning run (from the float weights) with straight-through gradients.
    """

    def _layer(self) -> LayerQuant:
        return LayerQuant(weight="binary", activation_bits=self.activation_bits)


@dataclasses.dataclass(frozen=True)
class TernaryWeights(_LowBit, Config):
    """Ternary weights ``alpha * t``, ``t`` in {-1, 0, +1} (TWN).

    ``t`` is 0 where ``|w| <= threshold * mean|w|`` (per output channel), else sign(w); ``alpha`` is the
    closed-form mean |w| of the kept weights, or, with ``learned_scale``, a trained per-channel parameter
    initialised to it. Other fields as in :class:`BinaryWeights`.
    """

    threshold: float = 0.7
    learned_scale: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive("threshold", self.threshold)
        if self.threshold >= 3:
            raise ConfigError(f"threshold={self.threshold} would zero almost every weight (it is a multiple of "
                              "mean|w|; TWN uses 0.7)")

    def _layer(self) -> LayerQuant:
        return LayerQuant(weight="ternary", threshold=self.threshold, learned_scale=self.learned_scale,
                          activation_bits=self.activation_bits)


def apply_lowbit(model: nn.Module, config: BinaryWeights | TernaryWeights, *, data, val_data=None,
                 calibration_data=None, loss_fn: LossFn | str | None = None, metric: Metric | None = None,
                 inplace: bool = False) -> nn.Module:
    """Train ``model`` (a copy unless ``inplace``) with binary or ternary weights on ``data`` with ``loss_fn``
    (``metric`` measured on ``val_data``) and return the converted model."""
    if not isinstance(config, (BinaryWeights, TernaryWeights)):
        raise ConfigError(f"expected BinaryWeights or TernaryWeights, got {type(config).__name__}")
    return run_qat(prepare_qat(model, config, inplace=inplace), config.train, data, val_data, calibration_data,
                   config.calibration_batches, loss_fn=loss_fn, metric=metric)


def apply_binary(model: nn.Module, config: BinaryWeights, *, data, val_data=None, calibration_data=None,
                 **training) -> nn.Module:
    """Binary-weight training of ``model``; returns the converted model (codes in {-1, +1}). ``training``:
    ``loss_fn``, ``metric``, ``inplace`` as in :func:`apply_lowbit`."""
    if not isinstance(config, BinaryWeights):
        raise ConfigError(f"apply_binary takes a BinaryWeights config, got {type(config).__name__}")
    return apply_lowbit(model, config, data=data, val_data=val_data, calibration_data=calibration_data, **training)


def apply_ternary(model: nn.Module, config: TernaryWeights, *, data, val_data=None,
                  calibration_data=None, **training) -> nn.Module:
    """Ternary-weight training of ``model``; returns the converted model (codes in {-1, 0, +1}). ``training``:
    ``loss_fn``, ``metric``, ``inplace`` as in :func:`apply_lowbit`."""
    if not isinstance(config, TernaryWeights):
        raise ConfigError(f"apply_ternary takes a TernaryWeights config, got {type(config).__name__}")
    return apply_lowbit(model, config, data=data, val_data=val_data, calibration_data=calibration_data, **training)
