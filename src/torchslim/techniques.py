"""The built-in techniques: an explicit list, the one place a new technique is added.

Provisional: families and order rules only (``apply`` and ``search`` are filled in by the technique
descriptors)."""

from __future__ import annotations

from .core.technique import Technique, Techniques
from .distillation import Distillation
from .lowrank import CP, SVD, Tucker
from .pipeline.runner import Finetune
from .pruning.config import StructuredPruning, UnstructuredPruning
from .quantization import (QAT, BinaryWeights, DynamicQuantization, Float8, MixedPrecision, StaticQuantization,
                           TernaryWeights, WeightOnly, WeightSharing)

_QUANTIZED = "pruning after quantization breaks the quantized weights; quantize last"
_NO_PRUNE_AFTER_QUANT = {"quantize": _QUANTIZED}
_LOWRANK_RULES = {
    "unstructured": "decomposing replaces the masked weights by dense factors, losing the zeros; decompose before "
                    "pruning",
    "quantize": "decomposing after quantization breaks the quantized weights; quantize last",
}


def _technique(config, family: str, cannot_follow=None) -> Technique:
    return Technique(config=config, apply=None, family=family, cannot_follow=cannot_follow or {})


BUILTIN = Techniques([
    _technique(UnstructuredPruning, "unstructured", _NO_PRUNE_AFTER_QUANT),
    _technique(StructuredPruning, "structured", {
        "unstructured": "structured pruning refuses layers that carry unstructured masks; put StructuredPruning "
                        "before UnstructuredPruning",
        **_NO_PRUNE_AFTER_QUANT}),
    *(_technique(c, "quantize") for c in (QAT, BinaryWeights, TernaryWeights, MixedPrecision, StaticQuantization,
                                         DynamicQuantization, WeightOnly, Float8, WeightSharing)),
    *(_technique(c, "lowrank", _LOWRANK_RULES) for c in (SVD, Tucker, CP)),
    _technique(Distillation, "distill"),
    _technique(Finetune, "finetune"),
])
