"""Layer-dropping students: a copy of a ``transformers`` model keeping some of its layers, initialised from them."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..core.errors import ConfigError, UnsupportedModelError
from ..nn.modules import copy_model
from .arch import STRUCTURE_FIELD, arch_of, layer_list
from .structure import sync_config

__all__ = ["drop_layers"]


def drop_layers(model: nn.Module, keep: Sequence[int], *, inplace: bool = False) -> nn.Module:
    """``model`` with only the layers ``keep`` (indices, in order), each a copy of the teacher's layer, and the
    config updated (layer count, per-layer fields), so it saves and reloads as any model of its class.

    A copy unless ``inplace``. Every removed layer's weights are gone; the kept ones are renumbered (their
    ``layer_idx`` for key/value caches follows the new order).
    """
    arch = arch_of(model)
    path, layers = layer_list(model)
    keep = list(keep)
    if not keep or any(not isinstance(i, int) or isinstance(i, bool) for i in keep):
        raise ConfigError(f"drop_layers: keep must be a non-empty list of layer indices, got {keep!r}")
    bad = [i for i in keep if not 0 <= i < len(layers)]
    if bad or len(set(keep)) != len(keep):
        raise ConfigError(f"drop_layers: keep={keep} must name distinct layers among 0..{len(layers) - 1}")
    if keep != sorted(keep):
        raise ConfigError(f"drop_layers: keep={keep} must be in increasing order (layers run in the teacher's order)")
    if getattr(model.config, "scale_attn_by_inverse_layer_idx", False) and keep != list(range(len(keep))):
        raise UnsupportedModelError("drop_layers: this GPT-2 scales attention by 1/(layer index + 1), so a layer "
                                    "moved to a new index would compute something else; keep a prefix of the layers")
    if not inplace:
        model = copy_model(model)
        path, layers = layer_list(model)
    kept = [layers[i] for i in keep]
    for new_index, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    setattr(parent, name, nn.ModuleList(kept))
    config = model.config
    old = getattr(config, arch.layers_field)
    for field in ("layer_types", STRUCTURE_FIELD):  # per-layer lists follow the kept layers
        value = getattr(config, field, None)
        if isinstance(value, list) and len(value) == old:
            setattr(config, field, [value[i] for i in keep])
    sync_config(model)
    return model
