"""Quantization: PTQ (dynamic, static, weight-only, fp8), QAT with STE / learned step size, binary and
ternary weights, k-means weight sharing and mixed precision, all behind ``quantize(model, config)``.

Importing this package registers the quantized modules and code encodings with the checkpoint, so
``torchslim.load`` can rebuild quantized models.
"""

from __future__ import annotations

import warnings
from typing import Callable

from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from ..core.history import carry, record
from ..metrics.evaluate import Metric
from ..training.losses import LossFn
from . import modules  # noqa: F401  (registers quantized modules and the intpack encoding)
from .lowbit import BinaryWeights, TernaryWeights, apply_binary, apply_ternary
from .mixed import MixedPrecision, apply_mixed_precision, quantize_mixed
from .ptq import (
    DynamicQuantization,
    Float8,
    StaticQuantization,
    WeightOnly,
    apply_dynamic,
    apply_fp8,
    apply_static,
    apply_weight_only,
)
from .qat import QAT, apply_qat, calibrate, convert, prepare_qat
from .sharing import WeightSharing, apply_weight_sharing
from .spec import QuantSpec

__all__ = ["quantize", "QuantSpec", "QAT", "BinaryWeights", "TernaryWeights", "MixedPrecision",
           "StaticQuantization", "DynamicQuantization", "WeightOnly", "Float8", "WeightSharing",
           "prepare_qat", "calibrate", "convert", "quantize_mixed"]

_TRAINED: dict[type, Callable[..., nn.Module]] = {
    QAT: apply_qat, BinaryWeights: apply_binary, TernaryWeights: apply_ternary,
    MixedPrecision: apply_mixed_precision,
}
_POST_TRAINING: dict[type, Callable[..., nn.Module]] = {
    StaticQuantization: apply_static, DynamicQuantization: apply_dynamic, WeightOnly: apply_weight_only,
    Float8: apply_fp8,
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
    calibration = calibration_data if calibration_data is not None else data
    data = data if data is not None else calibration_data
    kind = type(config)
    if kind in _TRAINED:
        out = _TRAINED[kind](model, config, data=data, val_data=val_data, calibration_data=calibration,
                             loss_fn=loss_fn, metric=metric, inplace=inplace)
    elif kind is WeightSharing:
        out = apply_weight_sharing(model, config, data=data, val_data=val_data, loss_fn=loss_fn, metric=metric,
                                   inplace=inplace)
    elif kind in _POST_TRAINING:
        out = _POST_TRAINING[kind](model, config, calibration_data=calibration, example_inputs=example_inputs,
                                   data=data, val_data=val_data)
    else:
        known = sorted(c.__name__ for c in [*_TRAINED, *_POST_TRAINING, WeightSharing])
        raise ConfigError(f"quantize() does not take {kind.__name__}; quantization configs: {known}")
    return record(carry(model, out), config)
