"""torchslim's public ``prune`` and ``save``, routing ``transformers`` models to the Hugging Face adapters.

The routing is a type check at the top of the verb, not a registry: pruning/ and export/ never import hf/.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .. import pruning
from ..core.errors import ConfigError
from ..core.history import record
from ..export import profile as export_profile
from ..export import save as export_save
from ..metrics import Profile
from ..metrics.evaluate import Metric
from ..nn.modules import copy_model
from ..pruning.config import Schedule, StructuredPruning
from ..training.losses import LossFn
from . import saving
from .arch import is_transformers_model
from .structure import prune_structure

__all__ = ["prune", "save", "profile", "prune_transformer"]


def prune_transformer(model: nn.Module, config: StructuredPruning, *, data=None, example_inputs=None,
                      loss_fn: LossFn | str | None = None, inplace: bool = False) -> nn.Module:
    """``StructuredPruning`` on a ``transformers`` model: ``config.ratio`` of the attention heads and of the FFN
    neurons of every layer removed (a mapping names the leaders of :func:`torchslim.hf.leaders`: attention modules
    for heads, first FFN projections for neurons), or of the whole model with ``scope="global"``, and
    ``config.hidden_ratio`` of the hidden size, scored by ``l1``/``l2``/``taylor``."""
    if config.schedule != Schedule():
        raise ConfigError("StructuredPruning on a Hugging Face model prunes once: use the default schedule and "
                          "fine-tune or distill afterwards (torchslim.finetune / torchslim.distill)")
    if config.bn_penalty:
        raise ConfigError("bn_penalty applies to BatchNorm scales, which transformer models do not have; set it to 0")
    if not inplace:
        model = copy_model(model)
    prune_structure(model, heads=config.ratio, ffn=config.ratio, hidden=config.hidden_ratio,
                    importance=config.importance, data=data, loss_fn=loss_fn, batches=config.importance_batches,
                    round_to=config.round_to, exclude=tuple(config.exclude), scope=config.scope,
                    max_ratio=config.max_ratio, example_inputs=example_inputs)
    return record(model, config)


def prune(model: nn.Module, config: Any, *, data=None, val_data=None, example_inputs=None,
          loss_fn: LossFn | str | None = None, metric: Metric | None = None, inplace: bool = False) -> nn.Module:
    """Prune ``model`` as ``config`` says and return the pruned model (a copy unless ``inplace``).

    See :func:`torchslim.pruning.prune`; ``StructuredPruning`` of a ``transformers`` model goes through its
    architecture adapter (heads and FFN neurons, no tracing; see :func:`prune_transformer`).
    """
    if is_transformers_model(model) and isinstance(config, StructuredPruning):
        return prune_transformer(model, config, data=data, example_inputs=example_inputs, loss_fn=loss_fn,
                                 inplace=inplace)
    return pruning.prune(model, config, data=data, val_data=val_data, example_inputs=example_inputs,
                         loss_fn=loss_fn, metric=metric, inplace=inplace)


def save(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write ``model`` to a ``.slim`` checkpoint; see :func:`torchslim.export.save`. A ``transformers`` model is
    recorded by class and config (see :func:`torchslim.hf.save`) unless ``factory`` is given."""
    if is_transformers_model(model) and "factory" not in kwargs:
        return saving.save(model, path, **kwargs)
    return export_save(model, path, **kwargs)


def profile(model: nn.Module, example_inputs: Any, *, latency: bool = True, size: bool = True, repeats: int = 30,
            **save_kwargs: Any) -> Profile:
    """Params, non-zero params, MACs, latency and bytes on disk of ``model``; see :func:`torchslim.export.profile`.
    A ``transformers`` model is sized as :func:`save` writes it (class and config recorded)."""
    if not (size and is_transformers_model(model) and "factory" not in save_kwargs):
        return export_profile(model, example_inputs, latency=latency, size=size, repeats=repeats, **save_kwargs)
    with_size = export_profile(model, example_inputs, latency=latency, size=False, repeats=repeats)
    with tempfile.TemporaryDirectory() as tmp:
        with_size.size_bytes = save(model, Path(tmp) / "model.slim", **save_kwargs).stat().st_size
    return with_size
