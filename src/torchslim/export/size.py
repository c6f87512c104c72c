"""Bytes on disk: the size of a model's real checkpoint, and the profile that reports it."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

from ..metrics import profile as metrics_profile
from ..metrics.profile import Profile
from .checkpoint import save


def saved_size(model: nn.Module, **save_kwargs) -> int:
    """Bytes of the real ``torchslim.save`` file of ``model`` (``save_kwargs`` go to ``save``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.slim"
        save(model, path, **save_kwargs)
        return os.path.getsize(path)


def profile(model: nn.Module, example_inputs: tuple, *, latency: bool = True, size: bool = True,
            repeats: int = 30) -> Profile:
    """Params, non-zero params, MACs, median latency (ms) and bytes on disk (of the saved checkpoint) of
    ``model``; see :func:`torchslim.metrics.profile`."""
    return metrics_profile(model, example_inputs, latency=latency, repeats=repeats,
                           size_fn=saved_size if size else None)
