"""Checkpoints (safetensors + JSON manifest, packed sparse tensors) and export."""

from .checkpoint import (
    CheckpointExistsError,
    load,
    read_manifest,
    register_encoding,
    register_module,
    save,
)

__all__ = ["save", "load", "read_manifest", "register_encoding", "register_module", "CheckpointExistsError"]
