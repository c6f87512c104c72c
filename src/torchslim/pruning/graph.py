"""Channel-dependency groups, found by tracing the model with ``torch.fx``.

A *group* is a set of coupled channel slots that can only be removed together: a conv's output channels
(dim 0 of its weight and bias), the BatchNorm after it, the input channels (dim 1) of every layer that
reads them, every other producer summed into them by a residual add, the matching slice of a
``torch.cat`` and the ``H*W`` input features per channel of a Linear after ``flatten``.

How it works: each tensor in the traced graph carries a *layout* of its channel dimension, a list of
segments, each pointing into a *channel space* (a union-find node) with ``n`` slots of ``rep``
consecutive indices. A producer (Conv, Linear) opens a new space; elementwise ops unite the spaces of
their operands; ``cat`` concatenates segments; ``flatten`` multiplies ``rep``. Anything the tracer does
not understand blocks the spaces it touches (with the reason), so a group is either pruned consistently
or left alone, never corrupted. Which op does what is decided by the op rules of ``oprules.py`` and
``seqrules.py``, through the primitives of ``_Builder``.

Some ops see a space as blocks (``spaces.py``, ties): a grouped conv reads and writes the same positions in
every group, so a space it touches is pruned block by block alike (its group's slots are positions within a
group); splitting channels into attention heads makes ``head_dim`` consecutive channels one slot.

Pruning through LayerNorm is supported but, unlike BatchNorm, changes the statistics of the remaining
channels, so the pruned model is then not exactly the original with those channels zeroed.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..nn.modules import match
from .layout import Layout as _Layout, Seg as _Seg
from .oprules import call_rule, handles_tuples, module_rule, node_arg
from .spaces import Spaces, constant_size, merged_dims, unit_dims_moved
from .trace import EXCLUDED, INPUT, OUTPUT, UNSUPPORTED, Group, Member, trace_model

__all__ = ["Member", "Group", "build_groups", "trace_model"]


class _Builder(Spaces):
    """Walks the traced graph once, building channel spaces, their members and blocking reasons."""

    def __init__(self, gm: fx.GraphModule, exclude: tuple[str, ...] = ()):
        self.gm = gm
        self.exclude = exclude
        super().__init__()
        self.layouts: dict[fx.Node, _Layout] = {}
        self.tuple_layouts: dict[fx.Node, tuple] = {}  # nodes returning tuples: a layout (or None) per item
        self.shared = self._shared_modules()

    def fixed(self, n: int, dim: int, kind: str, why: str) -> _Layout:
        return _Layout(dim, (_Seg(self.new_space(n, (kind, why)), n, 1),))

    # -- helpers ---------------------------------------------------------------------------------
    def _shared_modules(self) -> set[str]:
        """Modules called more than once or sharing a parameter with another module (tied weights)."""
        calls = Counter(n.target for n in self.gm.graph.nodes if n.op == "call_module")
        owners: dict[int, set[str]] = {}
        for target in calls:
            for p in self.gm.get_submodule(target).parameters():
                owners.setdefault(id(p), set()).add(target)
        shared = {t for t, c in calls.items() if c > 1}
        for names in owners.values():
            if len(names) > 1:
                shared |= names
        return shared

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None

    @staticmethod
    def inputs(node: fx.Node) -> list[fx.Node]:
        found: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n))
        return list(dict.fromkeys(found))

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.gm.get_submodule(node.target)).__name__})"
        if node.op == "call_method":
            return f"method .{node.target}() (node {node.name!r})"
        return f"function {getattr(node.target, '__name__', node.target)} (node {node.name!r})"

    def unknown(self, node: fx.Node, why: str | None = None, kind: str = UNSUPPORTED) -> None:
        why = why or f"{self.describe(node)} is not understood by the channel tracer"
        for n in self.inputs(node):
            self.block(self.layouts.get(n), kind, why)

    def require(self, node: Any, dim: int, who: str) -> _Layout:
        """The layout of ``node`` along ``dim``; a fixed one if it has none or its channels are elsewhere."""
        layout = self.layouts.get(node)
        if layout is not None and layout.dim == dim:
            return layout
        if layout is not None:
            self.block(layout, UNSUPPORTED, f"{who} works along dim {dim}, not the channel dim {layout.dim}")
        shape = self.shape(node)
        return self.fixed(shape[dim], dim, INPUT, "channels come from the model input, a constant or an "
                          "untraced op")

    # -- the walk --------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.order += 1
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                for n in self.inputs(node):
                    self.block(self.layouts.get(n), OUTPUT, "feeds the model output")
                continue
            if "tensor_meta" not in node.meta:
                continue  # sizes, dims, shapes: no tensor, no channels
            if not handles_tuples(node, self.gm) and (
                    any(self.shape(n) is None and "tensor_meta" in n.meta for n in self.inputs(node))
                    or self.shape(node) is None):
                excluded = node.op == "call_module" and match(node.target, self.exclude)
                self.unknown(node, f"{self.describe(node)} takes or returns a tuple of tensors"
                             + (" (excluded)" if excluded else ""), EXCLUDED if excluded else UNSUPPORTED)
                continue
            if node.op == "call_module":
                self.visit_module(node, self.gm.get_submodule(node.target))
            else:
                self.visit_call(node)

    def visit_module(self, node: fx.Node, mod: nn.Module) -> None:
        name = node.target
        rule = module_rule(mod)
        if name in self.shared:
            self.unknown(node, f"module {name!r} is called more than once or shares weights with another "
                               "layer; its channels are kept")
        elif rule is not None:
            rule(self, node, mod, name)
        elif match(name, self.exclude):
            self.unknown(node, f"its channels reach excluded module {name!r} (pattern "
                               f"{match(name, self.exclude)!r}), which is kept whole", EXCLUDED)
        else:
            self.unknown(node)

    def visit_call(self, node: fx.Node) -> None:
        """A function or method call: its rule, or keep the channels it touches."""
        rule = call_rule(node.target)
        if rule is not None:
            rule(self, node, None, None)
        else:
            self.unknown(node)

    # -- op rule primitives (``name``: the layer whose tensors are sliced, the node's module by default) --
    def conv(self, node: fx.Node, mod: nn.Module, x: fx.Node, name: str | None = None) -> None:
        name = name or node.target
        who = f"conv {name!r}"
        layout = self.require(x, 1, who)
        params = ["weight"] + (["bias"] if mod.bias is not None else [])
        if mod.groups == 1:
            for off, s in layout.with_offsets():
                self.add(s.space, Member(name, "weight", 1, off, s.rep, "in"))
            space = self.new_space(mod.out_channels)
            for p in params:
                self.add(space, Member(name, p, 0, 0, 1, "out"))
            self.layouts[node] = _Layout(1, (_Seg(space, mod.out_channels, 1),))
        elif mod.groups == mod.in_channels:
            # Depthwise: input channel c alone makes outputs c*k .. c*k+k-1, so they share its slot.
            k = mod.out_channels // mod.in_channels
            segs = []
            for off, s in layout.with_offsets():
                for p in params:
                    self.add(s.space, Member(name, p, 0, off * k, s.rep * k, "out"))
                segs.append(_Seg(s.space, s.n, s.rep * k))
            self.layouts[node] = _Layout(1, tuple(segs))
        else:
            self.grouped_conv(node, mod, layout, params, name)

    def grouped_conv(self, node: fx.Node, mod: nn.Module, layout: _Layout, params: list[str], name: str) -> None:
        """A conv with 1 < groups < in_channels: weight dim 1 indexes the position within a group, so the same
        positions are removed from every input group (and, independently, from every output group)."""
        g = mod.groups
        cg_in, cg_out = mod.in_channels // g, mod.out_channels // g
        reps = {s.rep for s in layout.segs}
        rep = reps.pop() if len(reps) == 1 else 0
        aligned = rep and cg_in % rep == 0 and all(off % cg_in == 0 and (s.n * s.rep) % cg_in == 0
                                                  for off, s in layout.with_offsets())
        if aligned:
            positions = self.new_space(cg_in // rep)
            self.add(positions, Member(name, "weight", 1, 0, rep, "in"))
            for _, s in layout.with_offsets():
                self.tie(s.space, positions, cg_in // rep)
        else:
            self.block(layout, UNSUPPORTED, f"grouped conv {name!r} (groups={g}) reads channels whose concatenated "
                                            "parts do not line up with its groups")
        space = self.new_space(mod.out_channels)
        for p in params:
            self.add(space, Member(name, p, 0, 0, 1, "out"))
        self.tie(space, self.new_space(cg_out), cg_out)
        self.layouts[node] = _Layout(1, (_Seg(space, mod.out_channels, 1),))

    def linear(self, node: fx.Node, mod: nn.Linear, x: fx.Node, name: str | None = None) -> None:
        name = name or node.target
        layout = self.require(x, len(self.shape(x)) - 1, f"linear {name!r}")
        for off, s in layout.with_offsets():
            self.add(s.space, Member(name, "weight", 1, off, s.rep, "in"))
        space = self.new_space(mod.out_features)
        for p in ["weight"] + (["bias"] if mod.bias is not None else []):
            self.add(space, Member(name, p, 0, 0, 1, "out"))
        self.layouts[node] = _Layout(len(self.shape(node)) - 1, (_Seg(space, mod.out_features, 1),))

    def per_channel(self, node: fx.Node, x: fx.Node, dim: int, params: list[str], name: str | None = None) -> None:
        """BatchNorm-like layer: one value per channel along ``dim``; records the channel count even
        without any per-channel tensor so ``num_features`` stays right."""
        name = name or node.target
        layout = self.require(x, dim, f"{name!r}")
        for off, s in layout.with_offsets():
            for p in params or [""]:
                self.add(s.space, Member(name, p, 0, off, s.rep, "norm"))
        self.layouts[node] = layout

    def layer_norm(self, node: fx.Node, mod: nn.LayerNorm, x: fx.Node, name: str | None = None) -> None:
        layout, nd = self.layouts.get(x), len(self.shape(x))
        first = nd - len(mod.normalized_shape)
        if layout is None or layout.dim < first:
            self.layouts[node] = layout  # normalises within each channel
            return
        if layout.dim > first:
            self.unknown(node, f"LayerNorm {name or node.target!r} normalises over the channel dim together "
                               "with preceding dims")
            return
        params = [p for p in ("weight", "bias") if getattr(mod, p, None) is not None]
        self.per_channel(node, x, first, params, name)

    def elementwise(self, node: fx.Node) -> None:
        out_nd = len(self.shape(node))
        tensors = [n for n in self.inputs(node) if self.shape(n) is not None]
        laid = [(n, self.layouts[n]) for n in tensors if n in self.layouts]
        if not laid:
            return
        dims = {lay.dim + out_nd - len(self.shape(n)) for n, lay in laid}
        if len(dims) > 1:
            return self.unknown(node, f"{self.describe(node)} combines tensors whose channels lie on "
                                      "different dims")
        dim = dims.pop()
        ref = laid[0][1]
        for n in tensors:
            if n in self.layouts:
                continue
            s = self.shape(n)
            k = dim - (out_nd - len(s))
            if k >= 0 and s[k] != 1:
                return self.unknown(node, f"{self.describe(node)} mixes the channels with tensor {n.name!r} "
                                          "that spans them but is not produced by a traced layer")
        if any(lay.signature() != ref.signature() for _, lay in laid[1:]) or self.shape(node)[dim] != ref.width:
            return self.unknown(node, f"{self.describe(node)} combines differently concatenated channels")
        for _, lay in laid[1:]:
            for a, b in zip(ref.segs, lay.segs):
                self.union(a.space, b.space)
        self.layouts[node] = _Layout(dim, ref.segs)

    def spatial(self, node: fx.Node, x: fx.Node, spatial_dims: int) -> None:
        layout = self.layouts.get(x)
        if layout is None:
            return
        if layout.dim >= len(self.shape(x)) - spatial_dims:
            return self.unknown(node, f"{self.describe(node)} pools or resizes along the channel dim")
        self.layouts[node] = layout

    def cat(self, node: fx.Node, parts: list, dim: int) -> None:
        nd = len(self.shape(node))
        dim %= nd
        if not any(p in self.layouts for p in parts):
            return
        if any(p in self.layouts and self.layouts[p].dim != dim for p in parts):
            return self.elementwise(node)  # concatenating along another dim: operands share channels
        segs: list[_Seg] = []
        for p in parts:
            lay = self.layouts.get(p) or self.fixed(self.shape(p)[dim], dim, INPUT, "concatenated with "
                                                    "channels from the model input or an untraced op")
            segs += lay.segs
        self.layouts[node] = _Layout(dim, tuple(segs))

    def flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        layout, shape = self.layouts.get(x), self.shape(x)
        if layout is None:
            return
        nd = len(shape)
        start, end = start % nd, end % nd
        if layout.dim < start:
            self.layouts[node] = layout
        elif layout.dim > end:
            self.layouts[node] = _Layout(layout.dim - (end - start), layout.segs)
        elif layout.dim == start:
            # Channel c becomes prod(shape[start+1:end+1]) consecutive features.
            m = math.prod(shape[start + 1:end + 1])
            self.layouts[node] = _Layout(start, tuple(_Seg(s.space, s.n, s.rep * m) for s in layout.segs))
        else:
            self.unknown(node, f"{self.describe(node)} flattens the channel dim into a preceding dim")

    def reshape(self, node: fx.Node, x: fx.Node, sizes: list | None = None) -> None:
        """``sizes``: the requested shape as written in the forward (ints and nodes), to tell a width fixed by
        a constant, which pruning would break, from one computed at run time (``-1``, ``x.size(...)``)."""
        src, dst = self.shape(x), self.shape(node)
        layout = self.layouts.get(x)
        fixed = sizes is not None and len(sizes) == len(dst)
        if layout is not None and src[:layout.dim] == dst[:layout.dim] and dst[layout.dim + 2:] == \
                src[layout.dim + 1:] and dst[layout.dim] * dst[layout.dim + 1] == src[layout.dim]:
            return self.split(node, layout, dst[layout.dim + 1], fixed and constant_size(sizes[layout.dim]))
        moved = unit_dims_moved(src, dst, layout.dim) if layout is not None else None
        if src == dst or moved is not None:
            if layout is not None:
                self.layouts[node] = _Layout(layout.dim if moved is None else moved, layout.segs)
        else:
            merge = merged_dims(src, dst, layout.dim if layout is not None else None)
            if merge is None:
                return self.unknown(node, f"{self.describe(node)} reshapes {list(src)} -> {list(dst)}, which is not "
                                          "a flatten; the channel tracer cannot follow it")
            self.flatten(node, x, *merge)
        out = self.layouts.get(node)
        if out is not None and fixed and constant_size(sizes[out.dim]):
            del self.layouts[node]
            self.unknown(node, f"{self.describe(node)} gives the channel dim the constant size {sizes[out.dim]}; "
                               "write -1 there (or compute it from the input's size) to let them be pruned")

    def split(self, node: fx.Node, layout: _Layout, width: int, constant: bool) -> None:
        """The channel dim split into (heads, ``width``): a head (``width`` consecutive channels) is one slot."""
        if constant:
            return self.unknown(node, f"{self.describe(node)} splits the channels into a constant number of heads; "
                                      "write -1 for the head count to let heads be pruned")
        if width == 1:  # (..., C) -> (..., C, 1): the channels stay where they are
            self.layouts[node] = layout
            return
        segs = []
        for off, s in layout.with_offsets():
            if width % s.rep or off % width or (s.n * s.rep) % width:
                return self.unknown(node, f"{self.describe(node)} splits the channels into heads that do not line "
                                          "up with the parts of a concatenation")
            f = width // s.rep
            heads = self.new_space(s.n // f)
            self.tie(s.space, heads, s.n // f, f)
            segs.append(_Seg(heads, s.n // f, 1))
        self.layouts[node] = _Layout(layout.dim, tuple(segs))

    def reduce(self, node: fx.Node, x: fx.Node) -> None:
        layout, nd = self.layouts.get(x), len(self.shape(x))
        if layout is None:
            return
        dims = node_arg(node, 1, "dim")
        keepdim = node_arg(node, 2, "keepdim", False)
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            return self.unknown(node, f"{self.describe(node)} reduces over the channel dim")
        dims = {d % nd for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
        if layout.dim in dims:
            return self.unknown(node, f"{self.describe(node)} reduces over the channel dim")
        shift = 0 if keepdim else sum(d < layout.dim for d in dims)
        self.layouts[node] = _Layout(layout.dim - shift, layout.segs)

    # -- result ----------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        where, extra = self.resolve_ties()
        out = []
        for root in range(len(self.parent)):
            if self.find(root) != root or root in where:
                continue
            members = [m for _, m in sorted(self.members[root] + extra.get(root, []), key=lambda om: om[0])]
            producers = [m for m in members if m.role == "out"]
            if not producers:
                continue  # e.g. the model input's channels: nothing to remove
            out.append(Group(producers[0].module, self.sizes[root], members, list(self.reasons[root])))
        order = {name: i for i, name in enumerate(n.target for n in self.gm.graph.nodes if n.op == "call_module")}
        out.sort(key=lambda g: order.get(g.leader, len(order)))
        return out


def build_groups(model: nn.Module, example_inputs: tuple | dict, exclude: tuple[str, ...] = ()) -> list[Group]:
    """Trace ``model`` and return its channel-dependency groups in execution order of their leaders.

    Groups feeding the model output, touching an op the tracer does not understand, or containing a
    layer (output channels or per-channel op) that matches an ``exclude`` fnmatch pattern are returned
    with ``reasons`` set (``prunable`` False). Raises UnsupportedModelError when the model cannot be traced.
    """
    gm = trace_model(model, example_inputs, tuple(exclude))
    builder = _Builder(gm, tuple(exclude))
    builder.run()
    groups = builder.groups()
    for g in groups:
        for m in g.members:
            pattern = match(m.module, tuple(exclude)) if m.role != "in" else None
            if pattern is not None:
                g.reasons.append((EXCLUDED, f"{m.module!r} matches exclude pattern {pattern!r}"))
                break
    return groups
