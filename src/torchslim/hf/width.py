"""Hidden-size pruning of ``transformers`` models: channels of the residual stream removed everywhere they live.

A residual channel is written by the embeddings (tables, patch convolutions, class and position tokens) and by
each layer's attention and FFN output projections, normalised by every LayerNorm / RMSNorm on the stream, and
read by each layer's attention and FFN input projections and by the heads on top (pooler, classifier, language
model head). Those heads are found by data flow, not by name: a Linear outside the layers reads the stream when
the rows it receives on an example batch are rows the stream carried (the final norm's output, a layer's output).

The layers keep their head size (it is set when a layer is built from ``hidden_size / heads`` in BERT, DistilBERT
and GPT-2), so where the config cannot say it (no ``head_dim``) ``config.torchslim_hidden`` records the width the
layers were built with and the stream's readers outside the layers, and :func:`torchslim.hf.build_model` /
:func:`torchslim.hf.from_pretrained` rebuild from it. Norms see fewer channels after pruning, so the pruned model
approximates the original rather than equalling it: distil or fine-tune afterwards.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError
from ..data.batches import call_model
from .arch import arch_of, layer_list

__all__ = ["HIDDEN_FIELD", "hidden_size", "stream_readers", "hidden_scores", "keep_hidden", "shrink_hidden",
           "record_hidden", "construct", "built_width"]

HIDDEN_FIELD = "torchslim_hidden"
"""Config attribute {"base": width the layers were built with, "readers": [Linear heads reading the stream]}."""

Slot = tuple[nn.Module, str, int]  # (module, parameter name, dimension indexing the residual channels)


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream, read from the first layer's FFN output projection."""
    arch = arch_of(model)
    w = layer_list(model)[1][0].get_submodule(arch.ffn_out).weight
    return int(w.shape[1] if arch.conv1d else w.shape[0])


def _is_norm(module: nn.Module, width: int) -> bool:
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and \
        isinstance(w, nn.Parameter) and tuple(w.shape) == (width,)


def _rows_from(x: torch.Tensor, streams: list[torch.Tensor], width: int, sample: int = 16) -> bool:
    """True when (a sample of) the rows of ``x`` are rows of one of the ``streams`` tensors."""
    rows = x.detach().reshape(-1, width)[:sample]
    for s in streams:
        flat = s.reshape(-1, width)
        if flat.dtype == rows.dtype and bool((rows[:, None, :] == flat[None]).all(-1).any(-1).all()):
            return True
    return False


def stream_readers(model: nn.Module, example_inputs: Any = None) -> list[str]:
    """Names of the Linear modules outside the layer list that read the residual stream (pooler, classifier, LM
    head), found by running ``example_inputs`` (``model.dummy_inputs`` by default)."""
    width = hidden_size(model)
    _, layers = layer_list(model)
    inside = {id(m) for m in layers.modules()}
    candidates = {name: m for name, m in model.named_modules() if id(m) not in inside and
                  _in_features(m) == width}
    if not candidates:
        return []
    if example_inputs is None:
        example_inputs = getattr(model, "dummy_inputs", None)
    streams: list[torch.Tensor] = []
    seen: dict[str, torch.Tensor] = {}

    def keep_stream(_m, _args, out):
        t = out[0] if isinstance(out, (tuple, list)) else out
        if torch.is_tensor(t) and t.shape[-1:] == (width,):
            streams.append(t.detach())

    def keep_input(name):
        def hook(_m, args):
            if args and torch.is_tensor(args[0]):
                seen[name] = args[0].detach()
        return hook

    hooks = [m.register_forward_hook(keep_stream) for m in model.modules() if _is_norm(m, width)]
    hooks += [layer.register_forward_hook(keep_stream) for layer in layers]
    hooks += [m.register_forward_pre_hook(keep_input(n)) for n, m in candidates.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            call_model(model, example_inputs)
    except Exception as exc:
        raise ConfigError(f"hidden-size pruning runs the model once to find which heads read the residual stream "
                          f"({sorted(candidates)}); that failed ({type(exc).__name__}: {exc}): pass "
                          "example_inputs= (a batch the model takes)") from exc
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sorted(n for n, x in seen.items() if _rows_from(x, streams, width))


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection, weight (in, out)
        return int(module.weight.shape[0])
    return None


def _slots(model: nn.Module, readers: list[str]) -> list[Slot]:
    """Every parameter dimension that indexes the residual channels."""
    arch = arch_of(model)
    width = hidden_size(model)
    in_dim, out_dim = (0, 1) if arch.conv1d else (1, 0)
    _, layers = layer_list(model)
    slots: list[Slot] = []
    for layer in layers:
        for path in ((arch.q,) if arch.fused else (arch.q, arch.k, arch.v)) + tuple(arch.ffn_in):
            slots.append((layer.get_submodule(path), "weight", in_dim))
        for path in (arch.out, arch.ffn_out):
            module = layer.get_submodule(path)
            slots.append((module, "weight", out_dim))
            if module.bias is not None:
                slots.append((module, "bias", 0))
    inside = {id(m) for m in layers.modules()}
    names = dict(model.named_modules())
    missing = [r for r in readers if r not in names or _in_features(names[r]) != width]
    if missing:
        raise CheckpointError(f"config.{HIDDEN_FIELD}: readers {missing} are not Linear modules {width} wide")
    for name, module in names.items():
        if _is_norm(module, width):
            slots += [(module, p, 0) for p in ("weight", "bias") if getattr(module, p, None) is not None]
        elif id(module) in inside:
            continue
        elif name in readers:
            slots.append((module, "weight", 0 if type(module).__name__ == "Conv1D" else 1))
        elif isinstance(module, nn.Embedding) and module.embedding_dim == width:
            slots.append((module, "weight", 1))
        elif isinstance(module, nn.modules.conv._ConvNd) and module.out_channels == width:
            slots += [(module, p, 0) for p in ("weight", "bias") if getattr(module, p, None) is not None]
        elif not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)):
            # class and position tokens held by an embeddings module (ViT)
            slots += [(module, p, t.dim() - 1) for p, t in module.named_parameters(recurse=False)
                      if t.dim() >= 1 and t.shape[-1] == width]
    return slots


def _unique(slots: list[Slot]) -> dict[int, tuple[nn.Parameter, int, list[tuple[nn.Module, str]]]]:
    """Slots grouped by parameter (tied embeddings and LM heads are one parameter, sliced once)."""
    out: dict[int, tuple[nn.Parameter, int, list[tuple[nn.Module, str]]]] = {}
    for module, name, dim in slots:
        p = getattr(module, name)
        if id(p) in out:
            if out[id(p)][1] != dim:
                raise ConfigError(f"{type(module).__name__}.{name} is shared with a module that indexes the hidden "
                                  "size along another dimension; hidden-size pruning cannot keep the tie")
            out[id(p)][2].append((module, name))
        else:
            out[id(p)] = (p, dim, [(module, name)])
    return out


def hidden_scores(model: nn.Module, readers: list[str], kind: str) -> torch.Tensor:
    """One score per residual channel: ``l1``/``l2`` magnitude or ``taylor`` |weight x gradient| summed over every
    parameter entry on that channel (parameters with no gradient count zero under ``taylor``)."""
    total = torch.zeros(hidden_size(model))
    for p, dim, _ in _unique(_slots(model, readers)).values():
        if kind == "taylor":
            t = (p.detach() * p.grad).abs() if p.grad is not None else torch.zeros_like(p)
        else:
            t = p.detach().abs() if kind == "l1" else p.detach().pow(2)
        total += t.float().movedim(dim, 0).reshape(t.shape[dim], -1).sum(1).cpu()
    return total


def keep_hidden(scores: torch.Tensor, ratio: float, round_to: int) -> list[int] | None:
    """The channels kept when ``ratio`` of them leave by lowest score (widths rounded up to ``round_to``)."""
    width = scores.numel()
    keep = max(1, width - math.floor(ratio * width))
    if round_to > 1:
        keep = min(width, math.ceil(keep / round_to) * round_to)
    if keep == width:
        return None
    return sorted(torch.argsort(scores, descending=True, stable=True)[:keep].tolist())


def shrink_hidden(model: nn.Module, keep: list[int], readers: list[str]) -> None:
    """Keep the ``keep`` residual channels of ``model`` IN PLACE (ties between parameters kept)."""
    index = torch.as_tensor(keep, dtype=torch.long)
    for p, dim, owners in _unique(_slots(model, readers)).values():
        new = nn.Parameter(p.detach().index_select(dim, index.to(p.device)).clone(), requires_grad=p.requires_grad)
        for module, name in owners:
            setattr(module, name, new)
    for module in model.modules():
        w = getattr(module, "weight", None)
        if not isinstance(w, torch.Tensor):
            continue
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = (int(s) for s in w.shape)
        elif type(module).__name__ == "Conv1D":
            module.nx, module.nf = (int(s) for s in w.shape)
        elif isinstance(module, nn.Embedding):
            module.embedding_dim = int(w.shape[1])
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = (int(w.shape[0]),)
        elif isinstance(module, nn.modules.conv._ConvNd):
            module.out_channels = int(w.shape[0])
    base = model.base_model
    if isinstance(getattr(base, "embed_dim", None), int):  # GPT-2 keeps its width on the base model
        base.embed_dim = len(keep)


def record_hidden(model: nn.Module, base: int, readers: list[str]) -> None:
    """Bring the config up to date after hidden-size pruning: ``hidden_size`` is the new width; where the config
    has ``head_dim`` it takes the layers' head size, otherwise ``config.torchslim_hidden`` records the width the
    layers were built with (``base``, or an earlier record's) and the stream's readers: what a rebuild needs."""
    arch = arch_of(model)
    config = model.config
    width = hidden_size(model)
    config.hidden_size = width
    if arch.head_dim_field:
        _, layers = layer_list(model)
        config.head_dim = int(getattr(layers[0].get_submodule(arch.attention), arch.head_size_attr))
        return
    previous = built_width(config)
    setattr(config, HIDDEN_FIELD, {"base": previous[0] if previous else int(base), "readers": list(readers)})


def construct(make: Callable[[Any], nn.Module], config: Any) -> nn.Module:
    """``make(config)``, with the layers built at the width ``config.torchslim_hidden`` records and the stream then
    cut to ``config.hidden_size`` (the first channels: weights are loaded afterwards)."""
    record = built_width(config)
    if record is None:
        return make(config)
    base, readers = record
    width = config.hidden_size
    config.hidden_size = base
    try:
        model = make(config)
    finally:
        config.hidden_size = width
    model.config.hidden_size = width
    shrink_hidden(model, list(range(width)), readers)
    return model


def built_width(config: Any) -> tuple[int, list[str]] | None:
    """(base width, readers) from ``config.torchslim_hidden``, validated; None when absent."""
    record = getattr(config, HIDDEN_FIELD, None)
    if record is None:
        return None
    if not (isinstance(record, dict) and isinstance(record.get("base"), int) and record["base"] > 0 and
            isinstance(record.get("readers"), list) and all(isinstance(r, str) for r in record["readers"])):
        raise CheckpointError(f"config.{HIDDEN_FIELD} must be {{'base': width, 'readers': [names]}}, got {record!r}")
    width = getattr(config, "hidden_size", None)
    if not (isinstance(width, int) and 0 < width <= record["base"]):
        raise CheckpointError(f"config.hidden_size {width!r} does not fit the recorded base width {record['base']}")
    return record["base"], list(record["readers"])
