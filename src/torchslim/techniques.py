"""The built-in techniques, listed explicitly (no package walking): what recipes, the stage runner, the search
and checkpoints look techniques up in. Importing this module registers their checkpoint codecs (once per
process), so ``torchslim.load`` can rebuild every module they create. Build your own registry to add one::

    registry = torchslim.techniques.BUILTIN.copy()
    registry.register(Technique(config=MyConfig, apply=my_apply, family="quantize"))
"""

from __future__ import annotations

from .core.technique import Technique, Techniques
from .export.checkpoint import register_codecs
from .distillation.technique import TECHNIQUES as _DISTILLATION
from .lowrank.technique import TECHNIQUES as _LOWRANK
from .pruning.technique import TECHNIQUES as _PRUNING
from .quantization.technique import TECHNIQUES as _QUANTIZATION
from .training.finetune import Finetune, finetune

FINETUNE = Technique(config=Finetune, apply=finetune, family="finetune")

BUILTIN = Techniques([*_PRUNING, *_QUANTIZATION, *_LOWRANK, *_DISTILLATION, FINETUNE])

# Techniques share module codecs (every quantization format creates QLinear, ...): each is registered once.
register_codecs(*dict.fromkeys(codec for t in BUILTIN.values() for codec in t.codecs))
