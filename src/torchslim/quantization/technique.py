"""The quantization techniques' descriptors: apply, family and search spaces."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..core.config import Config
from ..core.rates import int_choice, soften_bits
from ..core.technique import FieldSpace, SearchSpace, Technique
from . import quantize
from .lowbit import BinaryWeights, TernaryWeights
from .mixed import MixedPrecision
from .ptq import DynamicQuantization, Float8, StaticQuantization, WeightOnly
from .qat import QAT
from .sharing import WeightSharing, shareable_layers


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

_SPACES = {WeightSharing: WEIGHT_SHARING_SPACE, QAT: QAT_SPACE, WeightOnly: WEIGHT_ONLY_SPACE}
TECHNIQUES = tuple(
    Technique(config=cls, apply=quantize, family="quantize", search=_SPACES.get(cls))
    for cls in (QAT, BinaryWeights, TernaryWeights, MixedPrecision, StaticQuantization, DynamicQuantization,
                WeightOnly, Float8, WeightSharing))
