"""The built-in techniques, listed explicitly (no package walking): what recipes, the stage runner, the search
and checkpoints look techniques up in. Build your own registry to add one::

    registry = torchslim.techniques.BUILTIN.copy()
    registry.register(Technique(config=MyConfig, apply=my_apply, family="quantize"))
"""

from __future__ import annotations

from .core.technique import Technique, Techniques
from .distillation import distill
from .distillation.technique import TECHNIQUES as _DISTILLATION
from .lowrank import decompose
from .lowrank.technique import TECHNIQUES as _LOWRANK
from .pruning import prune
from .pruning.technique import TECHNIQUES as _PRUNING
from .quantization import quantize
from .quantization.technique import TECHNIQUES as _QUANTIZATION
from .nn.modules import copy_model
from .training.finetune import Finetune, finetune

# Until every verb takes the same keywords: adapters from the stage keywords to each verb's own.
def _prune(model, config, *, data, val_data, example_inputs, loss_fn=None, metric=None):
    return prune(model, config, example_inputs=example_inputs, data=data, val_data=val_data)


def _quantize(model, config, *, data, val_data, example_inputs, loss_fn=None, metric=None):
    return quantize(model, config, calibration_data=data, data=data, val_data=val_data, example_inputs=example_inputs)


def _decompose(model, config, *, data, val_data, example_inputs, loss_fn=None, metric=None):
    return decompose(model, config, example_inputs=example_inputs, data=val_data)[0]


def _distill(model, config, *, data, val_data, example_inputs, teacher, loss_fn=None, metric=None):
    return distill(copy_model(model), teacher, data, config, val_loader=val_data)


def _finetune(model, config, *, data, val_data, example_inputs, loss_fn=None, metric=None):
    return finetune(model, config, data=data, val_data=val_data)


_ADAPT = {prune: _prune, quantize: _quantize, decompose: _decompose, distill: _distill}
_ALL = [*_PRUNING, *_QUANTIZATION, *_LOWRANK, *_DISTILLATION]
_ALL = [Technique(t.config, _ADAPT[t.apply], t.family, t.cannot_follow, t.search, t.codecs, t.needs_teacher)
        for t in _ALL]
FINETUNE = Technique(config=Finetune, apply=_finetune, family="finetune")

BUILTIN = Techniques([*_ALL, FINETUNE])
