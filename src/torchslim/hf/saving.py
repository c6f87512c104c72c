"""Saving and reloading restructured ``transformers`` models: torchslim checkpoints and Hugging Face folders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..core.errors import CheckpointError
from ..export import save as export_save
from ..export.checkpoint import register_factory
from .arch import STRUCTURE_FIELD, apply_shapes, arch_of, build_model, construct, model_class

__all__ = ["save", "factory_kwargs", "from_pretrained"]

FACTORY = register_factory(build_model)  # its only job is building supported transformers classes


def factory_kwargs(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint records to rebuild ``model``: its class name and config (per-layer sizes included)."""
    arch_of(model)
    config = model.config.to_dict()
    return {"architecture": type(model).__name__, "config": json.loads(json.dumps(config, default=str))}


def save(model: nn.Module, path: str | os.PathLike, **kwargs: Any) -> Path:
    """:func:`torchslim.save` for a ``transformers`` model: the checkpoint rebuilds it from its class and config
    (pruned heads, FFN widths and dropped layers included), with no code from the file."""
    if "factory" in kwargs:
        return export_save(model, path, **kwargs)
    return export_save(model, path, factory=build_model, factory_kwargs=factory_kwargs(model), **kwargs)


def from_pretrained(folder: str | os.PathLike, architecture: str | None = None, **kwargs: Any) -> nn.Module:
    """Load a model written by ``save_pretrained`` whose layers differ from what its config's own fields
    describe (``config.torchslim_layers``, e.g. per-layer head counts; ``config.torchslim_hidden``, a pruned
    hidden size); plain folders load too.

    ``architecture`` (a transformers class name) defaults to the config's ``architectures[0]``; ``kwargs`` go to
    the class's ``from_pretrained`` (which reads the weights, in whatever layout that transformers version writes).
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; pass the folder save_pretrained wrote")
    config = json.loads(config_path.read_text())
    name = architecture or (config.get("architectures") or [None])[0]
    if name is None:
        raise CheckpointError(f"{config_path} names no architecture; pass architecture='BertModel' (the class)")
    cls = model_class(name, CheckpointError)

    def init(self, config, *args, **kw):
        construct(lambda c: cls.__init__(self, c, *args, **kw) or self, config)
        apply_shapes(self, getattr(config, STRUCTURE_FIELD, None))

    # The class's own loader (key renames, tied weights) on a subclass that builds the recorded layer sizes.
    shaped = type(cls.__name__, (cls,), {"__init__": init, "__module__": cls.__module__})
    model = shaped.from_pretrained(str(folder), **kwargs)
    model.__class__ = cls
    return model
