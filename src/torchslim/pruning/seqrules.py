"""Op rules for layers whose weights hold several coupled blocks or that return tuples (recurrent layers,
multi-head attention), transposed convs, GroupNorm, the layout ops (indexing, permute, transpose, pad) of
sequence and channels-last models, and the products of hand-written attention (heads in the batch dims). See ``oprules.py`` for what a rule is.

Recurrent hidden units: unit ``j`` of an LSTM (GRU) is row ``j`` of each of the 4 (3) gate blocks of
``weight_ih``, ``weight_hh`` and the biases, column ``j`` of ``weight_hh`` and, in the next layer, column
``j`` (and ``H + j`` when bidirectional) of ``weight_ih``. ``nn.LSTM`` has one ``hidden_size`` for every
layer and direction, so the same units are removed everywhere. A removed unit's zeroed gates keep its
state at zero from a zero initial state, so the pruned layer computes what the masked one does.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..nn.attention import PrunedMultiheadAttention
from ..nn.modules import match
from .layout import EXCLUDED, UNSUPPORTED, Layout, Member, Seg

if TYPE_CHECKING:
    from .graph import _Builder

__all__ = ["handles_tuples", "SEQUENCE_RULES"]

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def handles_tuples(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether the node's rule takes or returns tuples of tensors itself (the tracer blocks other such ops)."""
    if node.op == "call_function":
        return node.target is operator.getitem
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), (nn.RNNBase, nn.MultiheadAttention,
                                                           PrunedMultiheadAttention))
    return False


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _rnn(tracer: _Builder, node: fx.Node, module: nn.RNNBase, name: str) -> None:
    x = node.args[0]
    shape = tracer.shape(x)
    who = f"{type(module).__name__} {name!r}"
    if shape is None:
        return tracer.unknown(node, f"{who} is given a packed sequence; its hidden units are kept")
    if getattr(module, "proj_size", 0):
        return tracer.unknown(node, f"{who} has proj_size={module.proj_size}; its hidden units are kept")
    gates, h = _GATES.get(module.mode, 1), module.hidden_size
    dirs = 2 if module.bidirectional else 1
    last = len(shape) - 1
    layout = tracer.require(x, last, who)
    space = tracer.new_space(h)
    if _arg(node, 1, "hx") is not None:
        tracer.unknown(node, f"{who} is given an initial state, whose units are not traced; its hidden units "
                             "are kept")
        tracer.block(Layout(last, (Seg(space, h, 1),)), UNSUPPORTED, f"{who} is given an initial state")
    for layer in range(module.num_layers):
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            if layer == 0:
                for off, s in layout.with_offsets():
                    tracer.add(s.space, Member(name, "weight_ih" + sfx, 1, off, s.rep, "in"))
            else:
                for d2 in range(dirs):
                    tracer.add(space, Member(name, "weight_ih" + sfx, 1, d2 * h, 1, "in"))
            params = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
            for g in range(gates):
                for p in params:
                    tracer.add(space, Member(name, p + sfx, 0, g * h, 1, "out"))
            tracer.add(space, Member(name, "weight_hh" + sfx, 1, 0, 1, "in"))
    out = Layout(last, tuple(Seg(space, h, 1) for _ in range(dirs)))
    state = Layout(last, (Seg(space, h, 1),))  # h_n: (layers * dirs, [batch,] hidden)
    tracer.tuple_layouts[node] = (out, (state, state) if module.mode == "LSTM" else state)


def _reads(tracer: _Builder, x: Any, weights: list[tuple[str, str]], who: str) -> None:
    """Input ``x``'s channels are the columns (dim 1) of each of ``weights`` ((module, param) pairs)."""
    layout = tracer.require(x, len(tracer.shape(x)) - 1, who)
    for off, s in layout.with_offsets():
        for mod, param in weights:
            tracer.add(s.space, Member(mod, param, 1, off, s.rep, "in"))


def _attention(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    """Heads of ``nn.MultiheadAttention`` and ``PrunedMultiheadAttention``: head ``h`` is ``head_dim`` rows of the
    q, k and v projections (and biases, ``bias_k``, ``bias_v``) and ``head_dim`` columns of ``out_proj``. Its
    input channels are columns of the projections, its output channels rows of ``out_proj``. Pruning swaps an
    ``nn.MultiheadAttention`` for a ``PrunedMultiheadAttention`` (``structured.py``)."""
    who = f"{type(module).__name__} {name!r}"
    pattern = match(name, tracer.exclude)
    if pattern is not None:  # kept whole, so that it stays an nn.MultiheadAttention
        return tracer.unknown(node, f"its channels reach excluded module {name!r} (pattern {pattern!r}), which is "
                                    "kept whole", EXCLUDED)
    inputs = [_arg(node, i, n) for i, n in enumerate(("query", "key", "value"))]
    if any(tracer.shape(x) is None for x in inputs):
        return tracer.unknown(node, f"{who} is given inputs the channel tracer cannot follow")
    for x in tracer.inputs(node):  # masks: channels reaching them are not followed
        if x not in inputs:
            tracer.block(tracer.layouts.get(x), UNSUPPORTED, f"{who} is given them as a mask")
    e, d, out = module.embed_dim, module.head_dim, f"{name}.out_proj"
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is not None:
            rows = [(name, "in_proj_weight", i * e) for i in range(3)]
            if inputs[0] is inputs[1] is inputs[2]:
                _reads(tracer, inputs[0], [(name, "in_proj_weight")], who)
            else:  # one in_proj_weight reads all three: their channels cannot go one input at a time
                for x in dict.fromkeys(inputs):
                    tracer.block(tracer.layouts.get(x), UNSUPPORTED, f"{who} reads different query, key and value "
                                 "through one in_proj_weight; the channels it reads are kept (its heads are pruned)")
        else:
            rows = [(name, f"{p}_proj_weight", 0) for p in "qkv"]
            for x, (mod, param, _) in zip(inputs, rows):
                _reads(tracer, x, [(mod, param)], who)
        rows += [(name, "in_proj_bias", i * e) for i in range(3) if module.in_proj_bias is not None]
    else:
        layers = [f"{name}.{p}_proj" for p in "qkv"]
        if not all(isinstance(tracer.gm.get_submodule(m), nn.Linear) for m in layers + [out]):
            return tracer.unknown(node, f"the projections of {who} are no longer nn.Linear layers; its heads and "
                                        "the channels it reads are kept")
        rows = [(m, p, 0) for m in layers for p in ("weight", "bias") if getattr(tracer.gm.get_submodule(m), p)
                is not None]
        for x, mod in zip(inputs, layers):
            _reads(tracer, x, [(mod, "weight")], who)
    heads = tracer.new_space(module.num_heads)
    for mod, param, offset in rows:
        tracer.add(heads, Member(mod, param, 0, offset, d, "out"))
    for param in ("bias_k", "bias_v"):
        if getattr(module, param) is not None:
            tracer.add(heads, Member(name, param, 2, 0, d, "out"))
    tracer.add(heads, Member(out, "weight", 1, 0, d, "in"))
    attn_mask = _arg(node, 5, "attn_mask")
    if isinstance(attn_mask, fx.Node) and len(tracer.shape(attn_mask) or ()) == 3:
        tracer.block(Layout(0, (Seg(heads, module.num_heads, 1),)), UNSUPPORTED,
                     f"{who} is given a per-head attn_mask; its heads are kept")
    weights_used = any(u.target is not operator.getitem or u.args[1] != 0 for u in node.users)
    if _arg(node, 4, "need_weights", True) is not False and weights_used:
        tracer.block(Layout(0, (Seg(heads, module.num_heads, 1),)), UNSUPPORTED,
                     f"the attention weights of {who} are used, and would cover fewer heads; its heads are kept")
    width = tracer.gm.get_submodule(out).out_features
    space = tracer.new_space(width)
    for param in ("weight", "bias"):
        if getattr(tracer.gm.get_submodule(out), param) is not None:
            tracer.add(space, Member(out, param, 0, 0, 1, "out"))
    tracer.tuple_layouts[node] = (Layout(len(tracer.shape(inputs[0])) - 1, (Seg(space, width, 1),)), None)


def _getitem(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    x, idx = node.args[0], node.args[1]
    if x in tracer.tuple_layouts:
        item = tracer.tuple_layouts[x][idx] if isinstance(idx, int) else None
        if isinstance(item, Layout):
            tracer.layouts[node] = item
        elif isinstance(item, tuple):
            tracer.tuple_layouts[node] = item
        return
    layout = tracer.layouts.get(x)
    if layout is None or tracer.shape(x) is None:
        return
    nd = len(tracer.shape(x))
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        at = idx.index(Ellipsis)
        used = sum(i is not None and i is not Ellipsis for i in idx)
        idx = idx[:at] + (slice(None),) * (nd - used) + idx[at + 1:]
    src = dst = 0
    new_dim = None
    for i in idx:
        if i is None:
            dst += 1
        elif isinstance(i, int) and src != layout.dim:
            src += 1
        elif isinstance(i, slice) and (src != layout.dim or i == slice(None)):
            new_dim = dst if src == layout.dim else new_dim
            src, dst = src + 1, dst + 1
        else:
            return tracer.unknown(node, f"{tracer.describe(node)} indexes into the channel dim")
    tracer.layouts[node] = Layout(new_dim if new_dim is not None else dst + layout.dim - src, layout.segs)


def _permute(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    x = node.args[0]
    layout = tracer.layouts.get(x)
    if layout is None:
        return
    nd = len(tracer.shape(x))
    if node.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
        a, b = _arg(node, 1, "dim0") % nd, _arg(node, 2, "dim1") % nd
        order = list(range(nd))
        order[a], order[b] = b, a
    else:
        dims = node.args[1:] if node.target == "permute" else (_arg(node, 1, "dims"),)
        order = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        order = [d % nd for d in order]
    tracer.layouts[node] = Layout(order.index(layout.dim), layout.segs)


def _pad(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    x = node.args[0]
    layout, pad = tracer.layouts.get(x), _arg(node, 1, "pad")
    if layout is None:
        return
    padded = len(tracer.shape(x)) - len(pad) // 2  # pad covers the trailing dims, last dim first
    if layout.dim >= padded and any(pad[2 * (len(tracer.shape(x)) - 1 - layout.dim):][:2]):
        return tracer.unknown(node, f"{tracer.describe(node)} pads the channel dim")
    tracer.layouts[node] = layout


def _batch_dims(tracer: _Builder, node: fx.Node, operands: list) -> None:
    """Attention products (``q @ k.transpose(-1, -2)``, ``weights @ v``, scaled_dot_product_attention): the
    channels (heads) must lie in the batch dims, where the operands' heads are coupled."""
    out_nd = len(tracer.shape(node))
    laid = [(tracer.layouts[a], out_nd - len(tracer.shape(a))) for a in operands if a in tracer.layouts]
    if not laid:
        return
    if any(lay.dim + shift >= out_nd - 2 or lay.dim >= len(tracer.shape(a)) - 2
           for (lay, shift), a in zip(laid, [a for a in operands if a in tracer.layouts])):
        return tracer.unknown(node, f"{tracer.describe(node)} multiplies along the channel dim")
    ref, shift = laid[0]
    for lay, s in laid[1:]:
        if lay.dim + s != ref.dim + shift or lay.signature() != ref.signature():
            return tracer.unknown(node, f"{tracer.describe(node)} combines channels laid out differently")
        for a, b in zip(ref.segs, lay.segs):
            tracer.union(a.space, b.space)
    tracer.layouts[node] = Layout(ref.dim + shift, ref.segs)


def _matmul(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    _batch_dims(tracer, node, list(node.args[:2]))


def _attention_call(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    _batch_dims(tracer, node, [_arg(node, i, n) for i, n in enumerate(("query", "key", "value"))])


def _softmax(tracer: _Builder, node: fx.Node, module: nn.Module | None, name: str | None) -> None:
    x = node.args[0]
    layout = tracer.layouts.get(x)
    if layout is None:
        return
    dim = module.dim if module is not None else _arg(node, 1, "dim")
    if dim is None or dim % len(tracer.shape(x)) == layout.dim:
        return tracer.unknown(node, f"{tracer.describe(node)} normalises over the channel dim")
    tracer.layouts[node] = layout


def _conv_transpose(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    if module.groups != 1:
        return tracer.unknown(node, f"transposed conv {name!r} has groups={module.groups}; only groups=1 is pruned")
    layout = tracer.require(node.args[0], 1, f"transposed conv {name!r}")
    for off, s in layout.with_offsets():
        tracer.add(s.space, Member(name, "weight", 0, off, s.rep, "in"))
    space = tracer.new_space(module.out_channels)
    tracer.add(space, Member(name, "weight", 1, 0, 1, "out"))
    if module.bias is not None:
        tracer.add(space, Member(name, "bias", 0, 0, 1, "out"))
    tracer.layouts[node] = Layout(1, (Seg(space, module.out_channels, 1),))


def _group_norm(tracer: _Builder, node: fx.Node, module: nn.GroupNorm, name: str) -> None:
    x = node.args[0]
    layout = tracer.require(x, 1, f"GroupNorm {name!r}")
    per_group = module.num_channels // module.num_groups
    reps = {s.rep for s in layout.segs}
    rep = reps.pop() if len(reps) == 1 else 0
    if not (rep and per_group % rep == 0 and all(off % per_group == 0 and (s.n * s.rep) % per_group == 0
                                                 for off, s in layout.with_offsets())):
        tracer.block(layout, UNSUPPORTED, f"GroupNorm {name!r}: its groups do not line up with the parts of its "
                                          "concatenated input")
        tracer.layouts[node] = layout
        return
    positions = tracer.new_space(per_group // rep)  # same positions pruned in every group: groups stay equal
    for _, s in layout.with_offsets():
        tracer.tie(s.space, positions, per_group // rep)
    params = [p for p in ("weight", "bias") if getattr(module, p, None) is not None]
    tracer.per_channel(node, x, 1, params, name)


SEQUENCE_RULES: tuple[tuple[Any, Any], ...] = (
    (nn.RNNBase, _rnn), (nn.MultiheadAttention, _attention), (PrunedMultiheadAttention, _attention),
    (nn.ConvTranspose1d, _conv_transpose), (nn.ConvTranspose2d, _conv_transpose),
    (nn.ConvTranspose3d, _conv_transpose), (nn.GroupNorm, _group_norm),
    (operator.getitem, _getitem), (F.pad, _pad),
    (operator.matmul, _matmul), (torch.matmul, _matmul), ("matmul", _matmul),
    (F.scaled_dot_product_attention, _attention_call),
    (nn.Softmax, _softmax), (F.softmax, _softmax), (torch.softmax, _softmax), ("softmax", _softmax),
    ("permute", _permute), (torch.permute, _permute), ("transpose", _permute), (torch.transpose, _permute),
    ("swapaxes", _permute), (torch.swapaxes, _permute),
)
"""Built-in rules added to those of ``oprules.py``."""
