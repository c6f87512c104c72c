"""The quantization techniques' descriptors (apply, family, search space, checkpoint codecs) and ``quantize``,
which applies any of them. A new quantization format is a config, an apply function and a line in _APPLY."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from ..core.history import carry, record
from ..core.rates import int_choice, soften_bits
from ..core.technique import FieldSpace, SearchSpace, Technique
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from . import backends, codecs, sharing
from .lowbit import BinaryWeights, TernaryWeights, apply_binary, apply_ternary
from .mixed import MixedPrecision, apply_mixed_precision
from .convert import apply_dynamic, apply_fp8, apply_weight_only
from .ptq import DynamicQuantization, Float8, StaticQuantization, WeightOnly
from .static import apply_static
from .qat import QAT, apply_qat
from .sharing import WeightSharing, apply_weight_sharing, shareable_layers
from .soft_sharing import SoftWeightSharing, apply_soft_sharing

CODECS = (*codecs.CODECS, *backends.CODECS, *sharing.CODECS)


def _shareable(config: Config, model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    return [(name, None) for name in shareable_layers(model, tuple(config.exclude))]


def _bits_or_none(value: float, param: Any) -> int | None:
    return None if value == 0 else int(value)


def _apply_sharing(config: Config, values: dict[str, Any]) -> Config | None:
    bits = values.get("bits", config.bits)
    if bits is None or (isinstance(bits, dict) and not bits):
        return None  # every layer keeps its float weights: the stage has nothing to do
    return config.replace(bits=bits)


def _soften_weight_only(config: Config, factor: float) -> Config | None:
    return None if config.bits >= 8 else config.replace(bits=4 if config.bits == 2 else 8)


def _soften_components(config: Config, factor: float) -> Config | None:
    more = min(SOFT_COMPONENTS[0], math.ceil(config.components / factor))
    return None if more == config.components else config.replace(components=more)


def _qat_oneshot(config: Config) -> Config:
    # QAT always trains; one step keeps the scan one-shot (calibration plus fake quantization).
    return config.replace(train=config.train.replace(max_steps=1))


def _replace(config: Config, values: dict[str, Any]) -> Config:
    return config.replace(**values)


# Weight sharing: bits per layer; 0 leaves a layer's float weights alone.
WEIGHT_SHARING_SPACE = SearchSpace(
    fields=(FieldSpace("bits", low=0, high=8, mild=0, grid=(8, 6, 5, 4, 3, 2), layers=_shareable,
                       encode=_bits_or_none, choices=(0, 8, 6, 5, 4, 3, 2)),),
    apply=_apply_sharing, oneshot=lambda c: c.replace(finetune=None), soften=soften_bits(14))
QAT_SPACE = SearchSpace(
    fields=(FieldSpace("bits", low=2, high=8, mild=8, grid=(6, 4, 3, 2), encode=int_choice, choices=(8, 6, 4, 3, 2)),),
    apply=_replace, oneshot=_qat_oneshot, soften=soften_bits(8))
# Weight-only quantization has packed kernels for 8, 4 and 2 bits only.
WEIGHT_ONLY_SPACE = SearchSpace(
    fields=(FieldSpace("bits", low=2, high=8, mild=8, grid=(4, 2), encode=int_choice, choices=(8, 4, 2)),),
    apply=_replace, oneshot=lambda c: c, soften=_soften_weight_only)

# Soft weight-sharing: one mixture for the whole model, so one knob (its number of non-zero components).
SOFT_COMPONENTS = (64, 32, 16, 8, 4)
SOFT_SHARING_SPACE = SearchSpace(
    fields=(FieldSpace("components", low=4, high=64, mild=64, grid=SOFT_COMPONENTS[1:], encode=int_choice,
                       choices=SOFT_COMPONENTS),),
    apply=_replace, oneshot=lambda c: c.replace(train=c.train.replace(max_steps=1), finetune=None),
    soften=_soften_components)


def _trained(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def apply(model, config, *, data, val_data, example_inputs, loss_fn, metric, inplace):
        return fn(model, config, data=data, val_data=val_data, calibration_data=data, loss_fn=loss_fn,
                  metric=metric, inplace=inplace)
    return apply


def _post_training(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    def apply(model, config, *, data, val_data, example_inputs, loss_fn, metric, inplace):
        return fn(model, config, calibration_data=data, example_inputs=example_inputs, data=data, val_data=val_data)
    return apply


def _sharing(model, config, *, data, val_data, example_inputs, loss_fn, metric, inplace):
    return apply_weight_sharing(model, config, data=data, val_data=val_data, loss_fn=loss_fn, metric=metric,
                                inplace=inplace)


def _soft_sharing(model, config, *, data, val_data, example_inputs, loss_fn, metric, inplace):
    return apply_soft_sharing(model, config, data=data, val_data=val_data, loss_fn=loss_fn, metric=metric,
                              inplace=inplace)


_APPLY: dict[type[Config], Callable[..., nn.Module]] = {
    QAT: _trained(apply_qat), BinaryWeights: _trained(apply_binary), TernaryWeights: _trained(apply_ternary),
    MixedPrecision: _trained(apply_mixed_precision), StaticQuantization: _post_training(apply_static),
    DynamicQuantization: _post_training(apply_dynamic), WeightOnly: _post_training(apply_weight_only),
    Float8: _post_training(apply_fp8), WeightSharing: _sharing, SoftWeightSharing: _soft_sharing,
}


def quantize(model: nn.Module, config: Config, *, data=None, val_data=None, example_inputs=None,
             loss_fn: LossFn | str | None = None, metric: Metric | None = None, inplace: bool = False,
             calibration_data=None) -> nn.Module:
    """Quantize ``model`` as ``config`` says and return the converted (deployable) model.

    ``data`` (any batch form of :mod:`torchslim.data.batches`) calibrates activation ranges (static PTQ, QAT)
    and trains QAT, binary/ternary, centroid fine-tuning and mixed precision, with ``loss_fn`` (default
    cross-entropy); ``metric`` is measured on ``val_data`` while training and drives mixed precision's
    accuracy scan. ``example_inputs`` (a tensor, tuple or dict) is what static PTQ traces and times.
    The model is copied unless ``inplace`` (which lets the trained techniques reuse it); the config is
    recorded in the returned model's history. ``calibration_data`` is a deprecated alias of ``data``.
    """
    if calibration_data is not None:
        warnings.warn("quantize(calibration_data=...) is deprecated: pass the calibration / training loader as "
                      "data=", DeprecationWarning, stacklevel=2)
        data = data if data is not None else calibration_data
    apply = _APPLY.get(type(config))
    if apply is None:
        known = sorted(c.__name__ for c in _APPLY)
        raise ConfigError(f"quantize() does not take {type(config).__name__}; quantization configs: {known}")
    out = apply(model, config, data=data, val_data=val_data, example_inputs=example_inputs, loss_fn=loss_fn,
                metric=metric, inplace=inplace)
    return record(carry(model, out), config)


_SPACES = {WeightSharing: WEIGHT_SHARING_SPACE, QAT: QAT_SPACE, WeightOnly: WEIGHT_ONLY_SPACE,
           SoftWeightSharing: SOFT_SHARING_SPACE}
TECHNIQUES = tuple(Technique(config=cls, apply=quantize, family="quantize", search=_SPACES.get(cls), codecs=CODECS)
                   for cls in _APPLY)
