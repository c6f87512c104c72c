"""Calibration passes: the first batches of a loader, held once and fed through a model on demand."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..core.errors import ConfigError, DataError
from .batches import call_model, split_batch, to_device

__all__ = ["calibration_runner"]


def calibration_runner(model: nn.Module, data: Iterable | None, batches: int, what: str) -> Callable[[int], None]:
    """``run(k)``: a no-grad, eval-mode forward pass of ``model`` over the first ``k`` (at most ``batches``) of
    the first ``batches`` inputs of ``data``. The inputs are read once and reused, so every pass sees the same
    samples even from a shuffling loader. ``what`` names the caller in errors.

    ``run.token_mask()`` is, while a pass runs, the 2-D ``attention_mask`` of the batch being fed (None for
    batches without one), so that layer statistics can leave padding tokens out."""
    if data is None:
        raise ConfigError(f"{what} reconstructs layers from calibration activations: pass data= (a loader of "
                          "training batches; a few batches suffice)")
    held: list = []
    for batch in data:
        if len(held) >= batches:
            break
        held.append(split_batch(batch)[0])
    if not held:
        raise DataError(f"{what}: data= yielded no batches")

    current: list = [None]

    def run(k: int) -> None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        modes = {mod: mod.training for mod in model.modules()}
        try:
            model.eval()
            with torch.no_grad():
                for inputs in held[:k]:
                    inputs = to_device(inputs, device)
                    current[0] = _attention_mask(inputs)
                    call_model(model, inputs)
        finally:
            current[0] = None
            for mod, training in modes.items():
                mod.training = training

    run.token_mask = lambda: current[0]  # type: ignore[attr-defined]
    return run


def _attention_mask(inputs) -> torch.Tensor | None:
    """A dict batch's ``[batch, seq]`` attention mask as bool (None when there is none, or not of that form)."""
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    return mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None
