"""Quantization: PTQ (dynamic, static, weight-only, fp8), QAT with STE / learned step size, binary and
ternary weights, k-means weight sharing and mixed precision, all behind ``quantize(model, config)``.

:data:`CODECS` holds the checkpoint codecs and encodings of every module quantization creates, so that
``torchslim.load`` can rebuild quantized models once they are registered.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..core.config import Config
from ..core.errors import ConfigError
from . import backends, modules, sharing
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
           "prepare_qat", "calibrate", "convert", "quantize_mixed", "CODECS"]

CODECS = (*modules.CODECS, *backends.CODECS, *sharing.CODECS)
"""Checkpoint codecs and encodings of the modules and code tensors quantization creates."""

_TRAINED: dict[type, Callable[..., nn.Module]] = {
    QAT: apply_qat, BinaryWeights: apply_binary, TernaryWeights: apply_ternary,
    MixedPrecision: apply_mixed_precision,
}
_POST_TRAINING: dict[type, Callable[..., nn.Module]] = {
    StaticQuantization: apply_static, DynamicQuantization: apply_dynamic, WeightOnly: apply_weight_only,
    Float8: apply_fp8,
}


def quantize(model: nn.Module, config: Config, *, calibration_data=None, data=None, val_data=None,
             example_inputs: tuple | None = None) -> nn.Module:
    """Quantize a copy of ``model`` as ``config`` says and return the converted (deployable) model.

    ``calibration_data`` (a loader) sets activation ranges for static PTQ and QAT; ``data`` (a loader of
    ``(inputs, targets)``) trains QAT, binary/ternary and centroid fine-tuning; ``val_data`` is
    evaluated while training and used by mixed precision's sensitivity scan.
    """
    kind = type(config)
    if kind in _TRAINED:
        return _TRAINED[kind](model, config, data=data, val_data=val_data,
                              calibration_data=calibration_data if calibration_data is not None else data)
    if kind in _POST_TRAINING:
        return _POST_TRAINING[kind](model, config, calibration_data=calibration_data, example_inputs=example_inputs,
                                    data=data, val_data=val_data)
    if kind is WeightSharing:
        return apply_weight_sharing(model, config, data=data, val_data=val_data)
    known = sorted(c.__name__ for c in [*_TRAINED, *_POST_TRAINING, WeightSharing])
    raise ConfigError(f"quantize() does not take {kind.__name__}; quantization configs: {known}")
