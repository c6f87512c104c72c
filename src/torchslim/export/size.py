"""Bytes on disk: the size of a model's real checkpoint, and the profile that reports it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from ..metrics import profile as metrics_profile
from ..metrics.profile import Profile
from .checkpoint import save
from .checkpoint.format import parse_header, read_verified, stored_parts


def file_layout(path: str | os.PathLike) -> dict:
    """Where the bytes of the checkpoint at ``path`` go (either format): ``file`` (total), ``parts`` (bytes of
    each stored tensor part, e.g. ``"fc1.codes"``), ``manifest`` (the manifest as stored: compressed in format 2,
    JSON text in format 1) and ``header`` (everything that is not a part: container header and manifest)."""
    path = Path(path)
    manifest, data = read_verified(path)
    header, start = parse_header(data, path)
    if manifest["format_version"] == 1:
        parts = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
        stored_manifest = len(header["__metadata__"]["torchslim"].encode())
    else:
        # The payload starts with the compressed manifest's uint32 length.
        stored_manifest = int.from_bytes(data[start:start + 4], "little")
        parts = {k: v.numel() * v.element_size() for k, v in stored_parts(manifest, data, path).items()}
    return {"file": len(data), "header": len(data) - sum(parts.values()), "manifest": stored_manifest,
            "parts": parts}


def saved_size(model: nn.Module, **save_kwargs) -> int:
    """Bytes of the real ``torchslim.save`` file of ``model`` (``save_kwargs`` go to ``save``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.slim"
        save(model, path, **save_kwargs)
        return os.path.getsize(path)


def profile(model: nn.Module, example_inputs: tuple, *, latency: bool = True, size: bool = True,
            repeats: int = 30, **save_kwargs) -> Profile:
    """Params, non-zero params, MACs, median latency (ms) and bytes on disk (of the saved checkpoint) of
    ``model``; see :func:`torchslim.metrics.profile`. ``save_kwargs`` go to ``save`` (``factory`` and
    ``factory_kwargs`` for a model whose constructor needs arguments)."""
    return metrics_profile(model, example_inputs, latency=latency, repeats=repeats,
                           size_fn=(lambda m: saved_size(m, **save_kwargs)) if size else None)
