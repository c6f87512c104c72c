"""Checkpoints (safetensors + JSON manifest, packed sparse tensors), their size on disk, and export."""

from .checkpoint import (
    CheckpointExistsError,
    Encoding,
    ModuleCodec,
    load,
    read_manifest,
    register_codecs,
    register_encoding,
    register_factory,
    register_module,
    save,
)
from .size import file_layout, profile, saved_size

__all__ = ["save", "load", "read_manifest", "register_factory", "register_codecs", "register_encoding", "register_module",
           "ModuleCodec", "Encoding", "CheckpointExistsError", "saved_size", "profile", "file_layout"]
