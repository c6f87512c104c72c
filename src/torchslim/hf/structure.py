"""Structured pruning of ``transformers`` models: attention heads, FFN neurons, the hidden size (``width.py``) and
whole layers (``students.py``), removed for real.

Heads and neurons are scored per layer (weight magnitude, or Taylor |weight x gradient| from data batches and a
loss), the plan is checked as a whole (no layer may lose every head) before any weight changes, the projections
are sliced through the architecture adapter (``arch.py``) and the model's config is brought up to date
(:func:`sync_config`), so ``save_pretrained`` and torchslim checkpoints describe the smaller model.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn

from ..core.checks import check_choice, check_fraction
from ..core.errors import ConfigError, DataError, TorchslimError, UnsupportedModelError
from ..core.rates import capped_removals
from ..data.batches import LABEL_KEYS, as_example_inputs, call_model, split_batch
from ..nn.modules import match
from ..training.losses import LossFn, resolve_loss
from .arch import (
    STRUCTURE_FIELD,
    Arch,
    arch_of,
    by_parameter,
    config_layers,
    hidden_size,
    layer_list,
    layer_shape,
    layer_shapes,
    shrink_hidden,
    shrink_layer,
    stream_slots,
)
from .width import record_hidden, stream_readers

__all__ = ["prune_structure", "prune_heads", "sync_config", "leaders", "IMPORTANCES"]

IMPORTANCES = ("l1", "l2", "taylor")


def leaders(model: nn.Module) -> tuple[list[str], list[str]]:
    """Per layer, the names that stand for its heads (the attention module) and its FFN neurons (the first FFN
    projection): the keys of per-layer ratio mappings."""
    arch = arch_of(model)
    path, layers = layer_list(model)
    return ([f"{path}.{i}.{arch.attention}" for i in range(len(layers))],
            [f"{path}.{i}.{arch.ffn_in[0]}" for i in range(len(layers))])


def _ratios(name: str, value: float | dict[str, float], names: list[str], exclude: tuple[str, ...]) -> list[float]:
    if isinstance(value, dict):
        for key, v in value.items():
            check_fraction(f"{name}[{key!r}]", v)
            if key not in names and all(match(n, (key,)) is None for n in names):
                raise ConfigError(f"{name}[{key!r}] names no layer; the {name} rates are keyed by {names[:2]} ... "
                                  "(names or fnmatch patterns)")
        out = []
        for n in names:
            pattern = n if n in value else match(n, tuple(value))
            out.append(0.0 if pattern is None else float(value[pattern]))
        return [0.0 if match(n, exclude) is not None else r for n, r in zip(names, out)]
    check_fraction(name, value)
    return [0.0 if match(n, exclude) is not None else float(value) for n in names]


def _transform(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "taylor":
        if t.grad is None:
            return torch.zeros_like(t)
        return (t.detach() * t.grad).abs()
    return t.detach().abs() if kind == "l1" else t.detach().pow(2)


def _feature_scores(module: nn.Module, output: bool, conv1d: bool, kind: str) -> torch.Tensor:
    """One score per output (``output``) or input feature of a Linear / Conv1D."""
    dim = (1 if output else 0) if conv1d else (0 if output else 1)
    w = _transform(module.weight, kind).float()
    score = w.sum(dim=1 - dim)
    if output and module.bias is not None:
        score = score + _transform(module.bias, kind).float()
    return score


def _head_scores(layer: nn.Module, arch: Arch, kind: str) -> torch.Tensor:
    heads, kv, _ = layer_shape(layer, arch)
    size = int(getattr(layer.get_submodule(arch.attention), arch.head_size_attr))
    q = _feature_scores(layer.get_submodule(arch.q), True, arch.conv1d, kind)
    score = _feature_scores(layer.get_submodule(arch.out), False, arch.conv1d, kind).reshape(heads, size).sum(1)
    if arch.fused:  # q|k|v of each head, three blocks of heads
        return score + q.reshape(3, heads, size).sum((0, 2))
    score = score + q.reshape(heads, size).sum(1)
    if kv == heads:  # each head owns its key and value; with GQA they are shared and kept
        for path in (arch.k, arch.v):
            score = score + _feature_scores(layer.get_submodule(path), True, arch.conv1d, kind).reshape(
                heads, size).sum(1)
    return score


def _ffn_scores(layer: nn.Module, arch: Arch, kind: str) -> torch.Tensor:
    score = _feature_scores(layer.get_submodule(arch.ffn_out), False, arch.conv1d, kind)
    for path in arch.ffn_in:
        score = score + _feature_scores(layer.get_submodule(path), True, arch.conv1d, kind)
    return score


def _taylor_grads(model: nn.Module, data: Iterable | None, loss_fn: LossFn | str | None, batches: int) -> None:
    """Accumulate gradients of ``loss_fn`` over ``batches`` batches of ``data`` (eval mode: no dropout)."""
    if data is None:
        raise ConfigError("importance='taylor' scores heads and neurons by |weight x gradient|: pass data= (batches, "
                          "e.g. dicts from the tokenizer) and loss_fn=loss(outputs, batch)")
    seen = 0
    was_training = model.training
    model.eval()
    try:
        for batch in data:
            if seen >= batches:
                break
            if loss_fn is None:
                if not (isinstance(batch, dict) and any(k in batch for k in LABEL_KEYS)):
                    raise ConfigError("importance='taylor' needs a loss: pass loss_fn=loss(outputs, batch) (e.g. a "
                                      "cosine or MSE loss on embeddings), or give the batches 'labels' so the model "
                                      "computes its own loss")
                loss = resolve_loss("model_loss")
            else:
                loss = resolve_loss(loss_fn)
            inputs, _ = split_batch(batch, keep_labels=loss.keep_labels)
            value = loss(call_model(model, inputs), batch)
            if not (torch.is_tensor(value) and value.numel() == 1):
                raise DataError(f"loss_fn must return a scalar tensor, got {type(value).__name__}")
            value.backward()
            seen += 1
    finally:
        model.train(was_training)
    if seen == 0:
        raise DataError("importance='taylor': data= yielded no batch")


def _top(score: torch.Tensor, keep: int) -> list[int]:
    return sorted(torch.argsort(score, descending=True, stable=True)[:keep].tolist())


def _groups(heads: int, kv: int) -> tuple[int, int]:
    """(key/value groups, query heads per group); multi-head attention is one group of all heads."""
    return (1, heads) if kv == heads else (kv, heads // kv)


def _keep_heads(score: torch.Tensor, heads: int, kv: int, remove: int) -> list[int] | None:
    """Query heads to keep when ``remove`` leave each key/value group (with GQA the groups must stay even)."""
    groups, size = _groups(heads, kv)
    if remove <= 0:
        return None
    return sorted(g * size + i for g in range(groups) for i in _top(score[g * size:(g + 1) * size], size - remove))


def _keep_top(score: torch.Tensor, remove: int, round_to: int) -> list[int] | None:
    """The highest-scoring units kept when ``remove`` leave (at least one; counts rounded up to ``round_to``)."""
    n = score.numel()
    keep = max(1, n - remove)
    if round_to > 1:
        keep = min(n, math.ceil(keep / round_to) * round_to)
    return None if keep == n else _top(score, keep)


def _hidden_scores(model: nn.Module, readers: list[str], kind: str) -> torch.Tensor:
    """One score per residual channel, summed over every parameter entry on that channel."""
    total = torch.zeros(hidden_size(model))
    for p, dim, _ in by_parameter(stream_slots(model, readers)).values():
        t = _transform(p, kind).float()
        total += t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1).cpu()
    return total


def _keep_hidden(model: nn.Module, readers: list[str], importance: str, ratio: float, width: int,
                 round_to: int) -> list[int] | None:
    if not ratio:
        return None
    return _keep_top(_hidden_scores(model, readers, importance), math.floor(ratio * width), round_to)


def _global_counts(scores: list[torch.Tensor], rates: list[float], max_ratio: float) -> list[int]:
    """How many units leave each layer when the rate's share of all units of the layers with a non-zero rate (the
    others are excluded) is removed by score (each layer's scores divided by their mean, so layers of different
    scale compete fairly), at most ``max_ratio`` of a layer and never all of it."""
    rate = max(rates, default=0.0)
    caps = [min(math.floor(max_ratio * s.numel()), s.numel() - 1) if r > 0 else 0 for s, r in zip(scores, rates)]
    target = math.floor(rate * sum(s.numel() for s, r in zip(scores, rates) if r > 0))
    return capped_removals([s / s.mean().clamp(min=1e-12) for s in scores], target, caps)


def _output_shapes(model: nn.Module, example_inputs: Any) -> list[tuple[int, ...]]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        model.train(was_training)
    values = out.values() if hasattr(out, "values") else (out if isinstance(out, (tuple, list)) else [out])
    return [tuple(v.shape) for v in values if torch.is_tensor(v)]


def prune_structure(model: nn.Module, *, heads: float | dict[str, float] = 0.0, ffn: float | dict[str, float] = 0.0,
                    hidden: float = 0.0, importance: str = "l1", data: Iterable | None = None,
                    loss_fn: LossFn | str | None = None, batches: int = 4, round_to: int = 1,
                    exclude: tuple[str, ...] = (), scope: str = "layer", max_ratio: float = 0.9,
                    example_inputs: Any = None) -> dict[str, Any]:
    """Remove the ``heads`` share of attention heads and the ``ffn`` share of FFN neurons of every layer of the
    ``transformers`` ``model`` and the ``hidden`` share of its residual channels (the hidden size, see
    :mod:`torchslim.hf.width`), IN PLACE, and return a summary.

    Each rate is a fraction or {name or fnmatch pattern: fraction} over the names of :func:`leaders` (unlisted
    layers are kept). ``importance``: ``l1``/``l2`` weight magnitude or ``taylor`` (|weight x gradient| summed
    over ``batches`` batches of ``data`` with ``loss_fn(outputs, batch)``). ``round_to`` keeps FFN widths and the
    hidden size multiples of it. ``exclude`` names leaders left alone. With GQA the same number of query heads is
    removed from each key/value group. ``scope="global"`` removes each rate's share of all heads (and of all
    neurons) of the model where the scores, normalised per layer, are lowest, at most ``max_ratio`` of any layer
    (rates are then single fractions; the layers end up with different sizes). With ``example_inputs`` the output shapes are
    checked before and after (with ``hidden`` the last dimension may shrink).
    The summary: ``{"layers": [[heads, kv heads, neurons] before], "after": [...], "kept_heads": {i: [...]},
    "kept_ffn": {i: [...]}, "hidden": [width before, after], "kept_hidden": [...] or None}``.
    """
    if importance not in IMPORTANCES:
        raise ConfigError(f"importance for Hugging Face models must be one of {list(IMPORTANCES)}, got {importance!r}")
    if not (isinstance(batches, int) and batches > 0) or not (isinstance(round_to, int) and round_to > 0):
        raise ConfigError(f"batches and round_to must be positive integers, got {batches!r} and {round_to!r}")
    check_choice("scope", scope, ("layer", "global"))
    check_fraction("max_ratio", max_ratio)
    check_fraction("hidden", hidden)
    if scope == "global" and (isinstance(heads, dict) or isinstance(ffn, dict)):
        raise ConfigError("scope='global' ranks heads and neurons across layers with one rate each; use "
                          "scope='layer' for per-layer rate mappings")
    arch = arch_of(model)
    head_names, ffn_names = leaders(model)
    head_r = _ratios("heads", heads, head_names, tuple(exclude))
    ffn_r = _ratios("ffn", ffn, ffn_names, tuple(exclude))
    _, layers = layer_list(model)
    before = [layer_shape(layer, arch) for layer in layers]
    if example_inputs is not None:
        example_inputs = as_example_inputs(example_inputs)
        shapes = _output_shapes(model, example_inputs)
    width = hidden_size(model)
    readers = stream_readers(model, example_inputs) if hidden > 0 else []
    if importance == "taylor" and (any(head_r + ffn_r) or hidden > 0):
        params = list(model.parameters())
        saved = [(p.requires_grad, p.grad) for p in params]
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        try:
            _taylor_grads(model, data, loss_fn, batches)
            plans = _plan(layers, arch, head_r, ffn_r, importance, round_to, scope, max_ratio)
            keep_h = _keep_hidden(model, readers, importance, hidden, width, round_to)
        finally:
            for p, (req, grad) in zip(params, saved):
                p.requires_grad_(req)
                p.grad = grad
    else:
        with torch.no_grad():
            plans = _plan(layers, arch, head_r, ffn_r, importance, round_to, scope, max_ratio)
            keep_h = _keep_hidden(model, readers, importance, hidden, width, round_to)
    for layer, (keep_q, keep_kv, keep_ffn) in zip(layers, plans):
        shrink_layer(layer, arch, keep_q, keep_kv, keep_ffn)
    if keep_h is not None:
        shrink_hidden(model, keep_h, readers)
    sync_config(model)
    if keep_h is not None:
        record_hidden(model, width, readers)
    if example_inputs is not None:
        try:
            after = _output_shapes(model, example_inputs)
        except Exception as exc:  # an adapter bug must not pass silently
            raise TorchslimError(f"the pruned model no longer runs ({type(exc).__name__}: {exc}); please report "
                                 "this") from exc
        if [s[:-1] for s in after] != [s[:-1] for s in shapes] or (keep_h is None and after != shapes):
            raise TorchslimError(f"pruning changed the output shapes {shapes} -> {after}; please report this")
    return {"layers": [list(s) for s in before], "after": [list(s) for s in layer_shapes(model)],
            "kept_heads": {i: p[0] for i, p in enumerate(plans) if p[0] is not None},
            "kept_ffn": {i: p[2] for i, p in enumerate(plans) if p[2] is not None},
            "hidden": [width, hidden_size(model)], "kept_hidden": keep_h}


def _plan(layers: nn.ModuleList, arch: Arch, head_r: list[float], ffn_r: list[float], importance: str,
          round_to: int, scope: str, max_ratio: float
          ) -> list[tuple[list[int] | None, list[int] | None, list[int] | None]]:
    shapes = [layer_shape(layer, arch) for layer in layers]
    head_s = [_head_scores(layer, arch, importance) for layer in layers]
    ffn_s = [_ffn_scores(layer, arch, importance) for layer in layers]
    if scope == "layer":
        head_n = [math.floor(r * _groups(h, kv)[1]) for (h, kv, _), r in zip(shapes, head_r)]
        ffn_n = [math.floor(r * n) for (_, _, n), r in zip(shapes, ffn_r)]
    else:  # one rate over the whole model; with GQA a unit is the k-th weakest query head of every group
        units = [s.reshape(_groups(h, kv)).sort(dim=1).values.sum(0) if kv < h else s
                 for s, (h, kv, _) in zip(head_s, shapes)]
        head_n = _global_counts(units, head_r, max_ratio)
        ffn_n = _global_counts(ffn_s, ffn_r, max_ratio)
    return [(_keep_heads(hs, h, kv, hn), list(range(kv)), _keep_top(fs, fn, round_to))
            for (h, kv, _), hs, fs, hn, fn in zip(shapes, head_s, ffn_s, head_n, ffn_n)]


def prune_heads(model: nn.Module, heads: dict[int, list[int]]) -> nn.Module:
    """Remove the listed attention heads {layer index: [head indices]} of ``model`` IN PLACE and return it
    (multi-head attention only: with grouped key/value heads use :func:`prune_structure`)."""
    arch = arch_of(model)
    _, layers = layer_list(model)
    plans = {}
    for index, remove in heads.items():
        if not isinstance(index, int) or not 0 <= index < len(layers):
            raise ConfigError(f"prune_heads: layer {index!r} does not exist; the model has {len(layers)} layers")
        h, kv, _ = layer_shape(layers[index], arch)
        if kv != h:
            raise UnsupportedModelError(f"prune_heads: layer {index} shares key/value heads between query heads (GQA); "
                                        "use prune_structure(model, heads=...) which keeps the groups even")
        bad = [x for x in remove if not isinstance(x, int) or not 0 <= x < h]
        if bad:
            raise ConfigError(f"prune_heads: layer {index} has heads 0..{h - 1}, got {bad}")
        keep = sorted(set(range(h)) - set(remove))
        if not keep:
            raise ConfigError(f"prune_heads: the plan removes every head of layer {index}; keep at least one, or drop "
                              "the layer with torchslim.hf.drop_layers")
        plans[index] = keep
    for index, keep in plans.items():
        shrink_layer(layers[index], arch, keep, keep, None)
    sync_config(model)
    return model


def sync_config(model: nn.Module) -> None:
    """Bring ``model.config`` up to date with the model's layers: uniform sizes go into the config's own fields
    where they can (FFN width, layer count; head counts where the config has ``head_dim``), anything else into
    ``config.torchslim_layers`` ([heads, kv heads, neurons] per layer), which plain ``from_pretrained`` cannot read
    but :func:`torchslim.hf.from_pretrained` and torchslim checkpoints can."""
    arch = arch_of(model)
    config = model.config
    shapes = layer_shapes(model)
    setattr(config, arch.layers_field, len(shapes))
    if shapes and all(s == shapes[0] for s in shapes):
        h, kv, n = shapes[0]
        setattr(config, arch.ffn_field, n)
        if arch.head_dim_field and (h, kv) != config_layers(config, arch)[:2]:
            _, layers = layer_list(model)
            config.head_dim = int(getattr(layers[0].get_submodule(arch.attention), arch.head_size_attr))
            setattr(config, arch.heads_field, h)
            if arch.kv_field:
                setattr(config, arch.kv_field, kv)
    if all(s == config_layers(config, arch) for s in shapes):
        if hasattr(config, STRUCTURE_FIELD):
            delattr(config, STRUCTURE_FIELD)
    else:
        setattr(config, STRUCTURE_FIELD, [list(s) for s in shapes])
