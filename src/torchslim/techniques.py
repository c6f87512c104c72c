"""The built-in techniques, listed explicitly (no package walking): what recipes, the stage runner, the search
and checkpoints look techniques up in. Build your own registry to add one::

    registry = torchslim.techniques.BUILTIN.copy()
    registry.register(Technique(config=MyConfig, apply=my_apply, family="quantize"))
"""

from __future__ import annotations

from .core.technique import Technique, Techniques
from .distillation.technique import TECHNIQUES as _DISTILLATION
from .lowrank.technique import TECHNIQUES as _LOWRANK
from .pruning.technique import TECHNIQUES as _PRUNING
from .quantization.technique import TECHNIQUES as _QUANTIZATION
from .training.finetune import Finetune, finetune

FINETUNE = Technique(config=Finetune, apply=finetune, family="finetune")

BUILTIN = Techniques([*_PRUNING, *_QUANTIZATION, *_LOWRANK, *_DISTILLATION, FINETUNE])
