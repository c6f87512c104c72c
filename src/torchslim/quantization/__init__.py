"""Quantization: PTQ (dynamic, static, weight-only, fp8), QAT with STE / learned step size, binary and
ternary weights, k-means and soft weight sharing and mixed precision, all behind ``quantize(model, config)``.

:data:`CODECS` holds the checkpoint codecs and encodings of every module quantization creates; its technique
descriptors (:data:`TECHNIQUES`) carry them, and ``torchslim.techniques`` registers them for ``torchslim.load``.
"""

from __future__ import annotations

from .lowbit import BinaryWeights, TernaryWeights
from .mixed import MixedPrecision, quantize_mixed
from .ptq import DynamicQuantization, Float8, StaticQuantization, WeightOnly
from .qat import QAT, calibrate, convert, prepare_qat
from .sharing import WeightSharing
from .soft_sharing import SoftWeightSharing
from .spec import QuantSpec
from .technique import CODECS, TECHNIQUES, quantize

__all__ = ["quantize", "QuantSpec", "QAT", "BinaryWeights", "TernaryWeights", "MixedPrecision",
           "StaticQuantization", "DynamicQuantization", "WeightOnly", "Float8", "WeightSharing", "SoftWeightSharing",
           "prepare_qat", "calibrate", "convert", "quantize_mixed", "CODECS", "TECHNIQUES"]
