"""Architecture adapters: where each block's attention and FFN of a ``transformers`` model live.

Module-level rules instead of tracing (``BertModel`` does not fx-trace, and transformers 5 dropped
``transformers.utils.fx`` and ``prune_heads``): for each supported ``config.model_type`` an :class:`Arch` names
the layer list, the attention projections (q/k/v/out or GPT-2's fused ``c_attn``), the FFN projections (gated
up/gate/down for Llama), the attributes the attention module keeps about its heads, and the config fields.

A model whose structure changed in a way its config cannot express records it as
``config.torchslim_layers = [[query heads, key/value heads, FFN neurons], ...]`` (and a pruned hidden size as
``config.torchslim_hidden``, see :mod:`torchslim.hf.width`); :func:`build_model` rebuilds such a model from its
class name and config dict (the factory torchslim checkpoints record).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

from ..core.errors import CheckpointError, ConfigError, UnsupportedModelError

__all__ = ["Arch", "ARCHS", "LayerShape", "arch_of", "is_transformers_model", "layer_list", "layer_shapes",
           "build_model", "model_class", "apply_shapes", "shrink_layer", "config_layers", "STRUCTURE_FIELD",
           "supported", "HIDDEN_FIELD", "hidden_size", "stream_slots", "shrink_hidden", "built_width", "construct"]

STRUCTURE_FIELD = "torchslim_layers"
"""The config attribute holding per-layer sizes when the config's own fields cannot express them."""

LayerShape = tuple[int, int, int]
"""(query heads, key/value heads, FFN neurons) of one layer."""


def _set(**attrs: Callable[[int, int, int], Any]) -> Callable[[nn.Module, int, int, int], None]:
    """A setter of the attention module's head attributes from (query heads, kv heads, head size)."""
    def apply(module: nn.Module, heads: int, kv: int, size: int) -> None:
        for name, value in attrs.items():
            setattr(module, name, value(heads, kv, size))
    return apply


@dataclasses.dataclass(frozen=True)
class Arch:
    """Where one architecture keeps its blocks (paths relative to the base model / to one layer)."""

    model_types: tuple[str, ...]
    layers: tuple[str, ...]  # candidate paths of the layer ModuleList (older transformers named some differently)
    attention: str  # the module holding the head attributes
    q: str  # the query projection, or the fused q|k|v projection when ``fused``
    k: str | None
    v: str | None
    out: str
    ffn_in: tuple[str, ...]  # every projection into the FFN's hidden neurons (gate and up for gated FFNs)
    ffn_out: str
    head_size_attr: str
    set_heads: Callable[[nn.Module, int, int, int], None]
    heads_field: str
    layers_field: str
    ffn_field: str
    kv_field: str | None = None
    head_dim_field: bool = False  # the config's ``head_dim`` sets the head size (uniform head counts fit the config)
    fused: bool = False  # GPT-2: one Conv1D computes q|k|v
    conv1d: bool = False  # transformers' Conv1D: weight is (in, out)


_BERT = Arch(("bert", "roberta"), ("encoder.layer",), "attention.self", "attention.self.query",
             "attention.self.key", "attention.self.value", "attention.output.dense", ("intermediate.dense",),
             "output.dense", "attention_head_size",
             _set(num_attention_heads=lambda h, kv, d: h, all_head_size=lambda h, kv, d: h * d),
             "num_attention_heads", "num_hidden_layers", "intermediate_size")
_DISTILBERT = Arch(("distilbert",), ("transformer.layer",), "attention", "attention.q_lin", "attention.k_lin",
                   "attention.v_lin", "attention.out_lin", ("ffn.lin1",), "ffn.lin2", "attention_head_size",
                   _set(n_heads=lambda h, kv, d: h), "n_heads", "n_layers", "hidden_dim")
_VIT = Arch(("vit",), ("layers", "encoder.layer"), "attention", "attention.q_proj", "attention.k_proj",
            "attention.v_proj", "attention.o_proj", ("mlp.fc1",), "mlp.fc2", "head_dim",
            _set(num_attention_heads=lambda h, kv, d: h), "num_attention_heads", "num_hidden_layers",
            "intermediate_size", head_dim_field=True)
_GPT2 = Arch(("gpt2",), ("h",), "attn", "attn.c_attn", None, None, "attn.c_proj", ("mlp.c_fc",), "mlp.c_proj",
             "head_dim", _set(num_heads=lambda h, kv, d: h, split_size=lambda h, kv, d: h * d),
             "n_head", "n_layer", "n_inner", fused=True, conv1d=True)
_LLAMA = Arch(("llama",), ("layers",), "self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.o_proj", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "head_dim",
              _set(num_key_value_groups=lambda h, kv, d: h // kv), "num_attention_heads", "num_hidden_layers",
              "intermediate_size", kv_field="num_key_value_heads", head_dim_field=True)

ARCHS: tuple[Arch, ...] = (_BERT, _DISTILBERT, _VIT, _GPT2, _LLAMA)
"""The supported architectures (by ``config.model_type``)."""


def supported() -> list[str]:
    return [t for a in ARCHS for t in a.model_types]


def is_transformers_model(model: Any) -> bool:
    """True for a ``transformers`` model (checked without importing transformers)."""
    return isinstance(model, nn.Module) and type(model).__module__.startswith("transformers.") and \
        hasattr(model, "config") and hasattr(model, "base_model")


def arch_of(model: nn.Module) -> Arch:
    """The adapter of ``model`` or UnsupportedModelError naming the supported architectures."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for arch in ARCHS:
        if model_type in arch.model_types:
            return arch
    raise UnsupportedModelError(
        f"{type(model).__name__} (model_type {model_type!r}) has no torchslim.hf architecture adapter; supported "
        f"model types: {supported()}. Other models: torchslim.prune with StructuredPruning on a model that "
        "torch.fx can trace, or UnstructuredPruning")


def _layers_path(model: nn.Module, arch: Arch) -> str:
    base = model.base_model
    prefix = next((n for n, m in model.named_modules() if m is base), "")
    for path in arch.layers:
        try:
            found = base.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return f"{prefix}.{path}" if prefix else path
    raise UnsupportedModelError(f"{type(model).__name__}: no layer list at {list(arch.layers)}; this transformers "
                                "version lays the model out differently from what torchslim.hf knows")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The path and the ModuleList of ``model``'s transformer layers."""
    path = _layers_path(model, arch_of(model))
    return path, model.get_submodule(path)


def _out_features(layer: nn.Module, path: str, arch: Arch) -> int:
    w = layer.get_submodule(path).weight
    return int(w.shape[1] if arch.conv1d else w.shape[0])


def layer_shape(layer: nn.Module, arch: Arch) -> LayerShape:
    """(query heads, kv heads, FFN neurons) of one layer, read from its weights."""
    size = int(getattr(layer.get_submodule(arch.attention), arch.head_size_attr))
    if arch.fused:
        heads = kv = _out_features(layer, arch.q, arch) // (3 * size)
    else:
        heads = _out_features(layer, arch.q, arch) // size
        kv = _out_features(layer, arch.k, arch) // size
    return heads, kv, _out_features(layer, arch.ffn_in[0], arch)


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    arch = arch_of(model)
    return [layer_shape(layer, arch) for layer in layer_list(model)[1]]


def config_layers(config: Any, arch: Arch) -> LayerShape:
    """(query heads, kv heads, FFN neurons) a fresh layer built from ``config`` has."""
    heads = int(getattr(config, arch.heads_field))
    kv = int(getattr(config, arch.kv_field) or heads) if arch.kv_field else heads
    ffn = getattr(config, arch.ffn_field)
    if ffn is None:  # GPT-2's n_inner=None means 4 x the hidden size
        ffn = 4 * int(config.hidden_size)
    return heads, kv, int(ffn)


# ----------------------------------------------------------------------------------------------
# Slicing projections


def slice_proj(module: nn.Module, keep: torch.Tensor, *, output: bool, conv1d: bool) -> None:
    """Keep the ``keep`` output (``output``) or input features of a Linear / transformers Conv1D, in place."""
    dim = (1 if output else 0) if conv1d else (0 if output else 1)
    keep = keep.to(module.weight.device)
    module.weight = nn.Parameter(module.weight.detach().index_select(dim, keep).clone(),
                                 requires_grad=module.weight.requires_grad)
    if output and module.bias is not None:
        module.bias = nn.Parameter(module.bias.detach().index_select(0, keep).clone(),
                                   requires_grad=module.bias.requires_grad)
    if conv1d:
        module.nf = int(module.weight.shape[1])
    else:
        module.out_features, module.in_features = (int(s) for s in module.weight.shape)


def head_rows(heads: list[int], size: int, offset: int = 0) -> torch.Tensor:
    """The feature indices of ``heads`` (each ``size`` wide), shifted by ``offset``."""
    if not heads:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(offset + h * size, offset + (h + 1) * size) for h in heads])


def shrink_layer(layer: nn.Module, arch: Arch, keep_q: list[int] | None, keep_kv: list[int] | None,
                 keep_ffn: list[int] | None) -> None:
    """Remove heads (kept query heads ``keep_q``; kept kv heads ``keep_kv``) and FFN neurons of one layer."""
    heads, kv, _ = layer_shape(layer, arch)
    attn = layer.get_submodule(arch.attention)
    size = int(getattr(attn, arch.head_size_attr))
    if keep_q is not None:
        keep_kv = keep_q if kv == heads else keep_kv
        if arch.fused:
            rows = torch.cat([head_rows(keep_q, size, part * heads * size) for part in range(3)])
            slice_proj(layer.get_submodule(arch.q), rows, output=True, conv1d=arch.conv1d)
        else:
            slice_proj(layer.get_submodule(arch.q), head_rows(keep_q, size), output=True, conv1d=arch.conv1d)
            for path in (arch.k, arch.v):
                slice_proj(layer.get_submodule(path), head_rows(keep_kv, size), output=True, conv1d=arch.conv1d)
        slice_proj(layer.get_submodule(arch.out), head_rows(keep_q, size), output=False, conv1d=arch.conv1d)
        arch.set_heads(attn, len(keep_q), len(keep_kv), size)
    if keep_ffn is not None:
        idx = torch.as_tensor(keep_ffn, dtype=torch.long)
        for path in arch.ffn_in:
            slice_proj(layer.get_submodule(path), idx, output=True, conv1d=arch.conv1d)
        slice_proj(layer.get_submodule(arch.ffn_out), idx, output=False, conv1d=arch.conv1d)


# ----------------------------------------------------------------------------------------------
# The residual stream (hidden size): where its channels live, slicing them, rebuilding a narrower model


HIDDEN_FIELD = "torchslim_hidden"
"""Config attribute {"base": width the layers were built with, "readers": [Linear heads reading the stream]}."""

Slot = tuple[nn.Module, str, int]  # (module, parameter name, dimension indexing the residual channels)


def hidden_size(model: nn.Module) -> int:
    """The width of the residual stream, read from the first layer's FFN output projection."""
    arch = arch_of(model)
    w = layer_list(model)[1][0].get_submodule(arch.ffn_out).weight
    return int(w.shape[1] if arch.conv1d else w.shape[0])


def is_norm(module: nn.Module, width: int) -> bool:
    """A LayerNorm / RMSNorm over ``width`` channels."""
    w = getattr(module, "weight", None)
    return (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and \
        isinstance(w, nn.Parameter) and tuple(w.shape) == (width,)


def in_features(module: nn.Module) -> int | None:
    """Input width of a Linear or transformers Conv1D (None for other modules)."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projection, weight (in, out)
        return int(module.weight.shape[0])
    return None


def stream_slots(model: nn.Module, readers: list[str]) -> list[Slot]:
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
    missing = [r for r in readers if r not in names or in_features(names[r]) != width]
    if missing:
        raise CheckpointError(f"config.{HIDDEN_FIELD}: readers {missing} are not Linear modules {width} wide")
    for name, module in names.items():
        if is_norm(module, width):
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


def by_parameter(slots: list[Slot]) -> dict[int, tuple[nn.Parameter, int, list[tuple[nn.Module, str]]]]:
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


def shrink_hidden(model: nn.Module, keep: list[int], readers: list[str]) -> None:
    """Keep the ``keep`` residual channels of ``model`` IN PLACE (ties between parameters kept)."""
    index = torch.as_tensor(keep, dtype=torch.long)
    for p, dim, owners in by_parameter(stream_slots(model, readers)).values():
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


# ----------------------------------------------------------------------------------------------
# Rebuilding a restructured model (the checkpoint factory and from_pretrained)


def model_class(architecture: str, error: type) -> type:
    import transformers  # optional dependency: imported only when a Hugging Face model is rebuilt

    cls = getattr(transformers, architecture, None) if isinstance(architecture, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise error(f"{architecture!r} is not a transformers model class")
    model_type = getattr(cls.config_class, "model_type", None)
    if model_type not in supported():
        raise error(f"{architecture} (model_type {model_type!r}) has no torchslim.hf adapter; supported model "
                    f"types: {supported()}")
    return cls


def build_model(architecture: str, config: dict[str, Any]) -> nn.Module:
    """A fresh ``transformers.<architecture>`` built from the ``config`` dict, with the per-layer sizes of
    ``config["torchslim_layers"]`` and the hidden size of ``config["torchslim_hidden"]`` when present (weights
    are initialised, not loaded).

    Only transformers model classes of the supported architectures are built, and their constructors only
    build layers: a checkpoint naming this factory cannot make ``load`` run other code.
    """
    cls = model_class(architecture, CheckpointError)
    if not isinstance(config, dict):
        raise CheckpointError(f"build_model: config must be a dict, got {type(config).__name__}")
    cfg = cls.config_class.from_dict(dict(config))
    model = construct(cls, cfg)
    apply_shapes(model, getattr(cfg, STRUCTURE_FIELD, None))
    return model


def apply_shapes(model: nn.Module, shapes: Any) -> None:
    """Shrink a freshly built ``model``'s layers to ``shapes`` (kept features are the first ones: the weights
    are loaded afterwards)."""
    if shapes is None:
        return
    arch = arch_of(model)
    _, layers = layer_list(model)
    if not isinstance(shapes, (list, tuple)) or len(shapes) != len(layers):
        raise CheckpointError(f"config.{STRUCTURE_FIELD} must list (heads, kv heads, FFN neurons) for each of the "
                              f"{len(layers)} layers, got {shapes!r}")
    for layer, shape in zip(layers, shapes):
        if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(s, int) for s in shape)):
            raise CheckpointError(f"config.{STRUCTURE_FIELD}: malformed entry {shape!r}")
        heads, kv, ffn = layer_shape(layer, arch)
        want_h, want_kv, want_ffn = shape
        if not (0 < want_h <= heads and 0 < want_kv <= kv and 0 < want_ffn <= ffn):
            raise CheckpointError(f"config.{STRUCTURE_FIELD}: layer sizes {list(shape)} do not fit a layer of "
                                  f"{[heads, kv, ffn]}")
        group = heads // kv
        keep_q = None
        if want_h < heads or want_kv < kv:  # kept kv heads first, each with its kept share of query heads
            per = want_h // want_kv
            keep_q = [g * group + j for g in range(want_kv) for j in range(per)] if kv < heads else \
                list(range(want_h))
        shrink_layer(layer, arch, keep_q, list(range(want_kv)), list(range(want_ffn)) if want_ffn < ffn else None)
