"""Hugging Face ``transformers`` models: architecture adapters, structured pruning, layer-dropping students."""

from __future__ import annotations

from .api import prune, prune_transformer
from .arch import ARCHS, arch_of, build_model, is_transformers_model, layer_shapes, supported
from .saving import factory_kwargs, from_pretrained, save
from .structure import leaders, prune_heads, prune_structure, sync_config
from .students import drop_layers

__all__ = ["prune", "prune_transformer", "prune_structure", "prune_heads", "drop_layers", "save", "from_pretrained",
           "factory_kwargs", "leaders", "layer_shapes", "sync_config", "arch_of", "build_model", "supported",
           "is_transformers_model", "ARCHS"]
