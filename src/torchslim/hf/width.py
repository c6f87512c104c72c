"""Hidden-size pruning of ``transformers`` models: channels of the residual stream removed everywhere they live.

A residual channel is written by the embeddings (tables, patch convolutions, class and position tokens) and by
each layer's attention and FFN output projections, normalised by every LayerNorm / RMSNorm on the stream, and
read by each layer's attention and FFN input projections and by the heads on top (pooler, classifier, language
model head); ``arch.py`` knows where those parameters are and slices them. The heads are found by data flow, not
by name: a Linear outside the layers reads the stream when the rows it receives on an example batch are rows the
stream carried (the final norm's output, a layer's output).

The layers keep their head size (it is set when a layer is built from ``hidden_size / heads`` in BERT, DistilBERT
and GPT-2), so where the config cannot say it (no ``head_dim``) ``config.torchslim_hidden`` records the width the
layers were built with and the stream's readers outside the layers, and :func:`torchslim.hf.build_model` /
:func:`torchslim.hf.from_pretrained` rebuild from it. Norms see fewer channels after pruning, so the pruned model
approximates the original rather than equalling it: distil or fine-tune afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..data.batches import call_model
from .arch import HIDDEN_FIELD, arch_of, built_width, hidden_size, in_features, is_norm, layer_list

__all__ = ["stream_readers", "record_hidden"]


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
                  in_features(m) == width}
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

    hooks = [m.register_forward_hook(keep_stream) for m in model.modules() if is_norm(m, width)]
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


