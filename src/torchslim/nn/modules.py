"""Module helpers shared by every technique: copying, lookup and replacement by name, cached decoding."""

from __future__ import annotations

import copy
import fnmatch
from typing import Iterable

import torch
from torch import nn

from ..core.checks import did_you_mean
from ..core.errors import ConfigError


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies pruned models, without touching the original.

    ``torch.nn.utils.prune`` caches ``weight = weight_orig * weight_mask`` as a plain attribute, which is a
    non-leaf tensor after a forward pass with autograd, and deepcopy refuses those; a detached copy goes in
    its place (the next forward recomputes it anyway).
    """
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    return copy.deepcopy(model, memo)


def decoded_once(module: nn.Module, decode, *sources: torch.Tensor) -> torch.Tensor:
    """``decode()`` (e.g. integer codes -> float weight), computed once and reused while ``module`` runs inference
    (eval mode, no autograd), as a deployed model decodes at load time; training always decodes afresh.

    The cached result is dropped when any of ``sources`` changes: integer tensors are tracked by identity and
    version counter (every PyTorch op that writes them bumps it), floating ones also by value, since edits
    through ``.data`` bypass the counter and those tensors (scales, codebooks) are small."""
    if module.training or torch.is_grad_enabled():
        return decode()
    key = [(t, t._version) for t in sources]
    hit = module.__dict__.get("_decoded")
    if hit is not None and len(hit[0]) == len(key) and all(
            a is b and v == w for (a, v), (b, w) in zip(hit[0], key)) and all(
            torch.equal(old, t) for old, t in zip(hit[1], sources) if t.is_floating_point()):
        return hit[2]
    value = decode()
    module.__dict__["_decoded"] = (key, [t.detach().clone() if t.is_floating_point() else None for t in sources], value)
    return value


def match(name: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` (fnmatch, case-sensitive) that the layer name ``name`` matches, or None."""
    return next((p for p in patterns if fnmatch.fnmatchcase(name, p)), None)


def check_patterns(field: str, patterns: Iterable[str], names: Iterable[str], kinds: str = "") -> None:
    """ConfigError naming the first of ``patterns`` that matches none of the layer ``names`` it selects from
    (``kinds`` describes them, e.g. ``"Linear/Conv"``), with the closest names: a pattern with a typo would
    otherwise select or exclude nothing, silently."""
    names = list(names)
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            continue
        hint = did_you_mean(pattern, names, n=3, cutoff=0.5)
        shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
        kind = f"{kinds} " if kinds else ""
        raise ConfigError(f"{field}: pattern {pattern!r} matches no {kind}layer{hint}; layers are: "
                          f"{shown or 'none'}. Fix the pattern (fnmatch, case-sensitive) or remove it")
