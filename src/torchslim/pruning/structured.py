"""Structured pruning: remove whole channels / neurons for real, consistently across coupled layers.

``structured_prune`` traces the model into channel-dependency groups (``graph.py``), scores each group's
channels (``importance.py``), picks the channels to keep and slices every coupled parameter, buffer and
layer attribute, leaving a smaller dense model of the same classes.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Iterable

import torch
from torch import nn

from ..core.errors import ConfigError, TorchslimError, UnsupportedModelError
from ..core.rates import capped_removals
from ..data.batches import as_example_inputs, call_model
from ..nn.attention import PrunedMultiheadAttention
from ..nn.masks import masked_names
from ..nn.modules import check_patterns, copy_model, match
from ..training.losses import LossFn
from .config import StructuredPruning
from .graph import UNSUPPORTED, Group, Member, build_groups
from .importance import group_importance

__all__ = ["structured_prune", "plan_keep", "apply_keep", "masked_like"]


def _check_model(model: nn.Module) -> None:
    for name, module in model.named_modules():
        layer = name or type(model).__name__
        masked = masked_names(module)
        if masked:
            raise UnsupportedModelError(
                f"layer {layer!r} carries an unstructured pruning mask ({masked[0]}_orig); apply structured pruning "
                f"before unstructured pruning, or call torch.nn.utils.prune.remove(module, {masked[0]!r}) first")
        for pname, p in module.named_parameters(recurse=False):
            if not torch.isfinite(p.detach()).all():
                raise UnsupportedModelError(f"layer {layer!r} has NaN/inf values in {pname!r}; channel importance "
                                            "would be meaningless. Fix or retrain the model first.")


def _untouched(model: nn.Module, groups: list[Group], exclude: tuple[str, ...]) -> list[str]:
    """The outermost layers with weights (more than a scalar) of which no group covers any part, as
    ``name (Type)``: a wrapper is named rather than the layer inside it that a rule for the wrapper would reach."""
    covered = {p for g in groups for m in g.members for p in _prefixes(m.module)}
    left: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            if match(path, exclude):
                continue
            if path in covered:
                visit(path, child)
            elif any(p.numel() > 1 for p in child.parameters()):
                left.append(f"{path} ({type(child).__name__})")

    visit("", model)
    return left


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _report_left(model: nn.Module, groups: list[Group], config: StructuredPruning) -> None:
    """Warn about layers structured pruning cannot touch; refuse when no group at all can be pruned."""
    left = _untouched(model, groups, tuple(config.exclude))
    if not any(g.prunable for g in groups):
        why = "; ".join(f"{g.leader!r}: {g.reason}" for g in groups[:8]) or "no Linear/Conv channels were found"
        also = f"; layers no channel rule covers: {', '.join(left[:12])}" if left else ""
        raise UnsupportedModelError(
            f"StructuredPruning: no channel of {type(model).__name__} can be removed ({why}{also}). Use "
            "UnstructuredPruning, or register a rule for the layer type with "
            "torchslim.pruning.register_op_rule")
    if left:
        more = f" and {len(left) - 12} more" if len(left) > 12 else ""
        warnings.warn(f"StructuredPruning leaves {len(left)} layer(s) as they are: {', '.join(left[:12])}{more}: "
                      "no channel rule covers their type, so their weights and channels are kept. Register one "
                      "with torchslim.pruning.register_op_rule, or put them in exclude=[...] to silence this",
                      UserWarning, stacklevel=3)


def _group_ratios(groups: list[Group], ratio: float | dict[str, float]) -> list[float]:
    """Each group's ratio: the float, or the mapping's entry for the group's leader (exact name first,
    then fnmatch pattern; unlisted groups are not pruned)."""
    if not isinstance(ratio, dict):
        return [float(ratio)] * len(groups)
    leaders = [g.leader for g in groups]
    unknown = [k for k in ratio if k not in leaders and all(match(leader, (k,)) is None for leader in leaders)]
    if unknown:
        raise ConfigError(f"ratio names layer(s) {unknown} that lead no channel group; a group's ratio is set "
                          f"by its leading layer, one of {leaders}")
    out = []
    for leader in leaders:
        if leader in ratio:
            out.append(float(ratio[leader]))
        else:
            pattern = match(leader, ratio)
            out.append(0.0 if pattern is None else float(ratio[pattern]))
    return out


def _round_keep(n: int, keep: int, round_to: int) -> int:
    """Channels to keep: at least 1, rounded up to a multiple of ``round_to`` (never above ``n``)."""
    keep = max(1, keep)
    if round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return min(n, keep)


def _top(score: torch.Tensor, keep: int) -> list[int]:
    order = torch.argsort(score, descending=True, stable=True)
    return sorted(order[:keep].tolist())


def plan_keep(groups: list[Group], scores: list[torch.Tensor], ratios: list[float], config: StructuredPruning
              ) -> list[list[int]]:
    """Channel indices to keep per group (all of them when a group is left alone).

    ``scope="layer"`` removes ``floor(ratio * n)`` channels per group; ``scope="global"`` removes the
    ``ratio`` share of all channels with the lowest normalised scores, at most ``max_ratio`` per group.
    """
    if config.scope == "layer":
        return [_top(s, _round_keep(g.size, g.size - math.floor(r * g.size), config.round_to))
                for g, s, r in zip(groups, scores, ratios)]
    total = sum(g.size for g in groups)
    target = math.floor(ratios[0] * total) if groups else 0
    caps = [min(math.floor(config.max_ratio * g.size), g.size - 1) for g in groups]
    removed = capped_removals(scores, target, caps)
    return [_top(s, _round_keep(g.size, g.size - r, config.round_to)) for g, s, r in zip(groups, scores, removed)]


def _member_size(module: nn.Module, param: str, dim: int) -> int:
    if not param:
        for attr in ("num_features", "num_channels"):
            if hasattr(module, attr):
                return getattr(module, attr)
        return module.normalized_shape[dim]
    return getattr(module, param).shape[dim]


def apply_keep(model: nn.Module, groups: list[Group], keeps: list[list[int]]) -> None:
    """Slice every member tensor of each group down to its kept channels and fix layer attributes.

    All groups' masks are combined first so that a tensor shared by several groups (a conv reading a
    ``torch.cat``) is sliced once with its original offsets.
    """
    masks: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    for g, keep in zip(groups, keeps):
        if len(keep) == g.size:
            continue
        removed = torch.ones(g.size, dtype=torch.bool)
        removed[keep] = False
        slots = removed.nonzero().flatten()
        for m in g.members:
            module = model.get_submodule(m.module)
            dims = masks.setdefault((m.module, m.param), {})
            if m.dim not in dims:
                dims[m.dim] = torch.ones(_member_size(module, m.param, m.dim), dtype=torch.bool)
            idx = m.offset + slots[:, None] * m.rep + torch.arange(m.rep)[None, :]
            dims[m.dim][idx.flatten()] = False
    counts: dict[str, int] = {}
    for (mname, pname), dims in masks.items():
        module = model.get_submodule(mname)
        counts[mname] = int(next(iter(dims.values())).sum())
        if not pname:
            continue
        old = getattr(module, pname)
        new = old.detach()
        for dim, keep_mask in dims.items():
            new = new.index_select(dim, keep_mask.nonzero().flatten().to(new.device))
        # A fresh contiguous copy: strided views of the old tensor would keep it alive and run slower.
        fmt = (torch.channels_last if new.dim() == 4 and not old.is_contiguous()
               and old.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format)
        new = new.contiguous(memory_format=fmt).clone(memory_format=fmt)
        if pname in module._parameters:
            module._parameters[pname] = nn.Parameter(new, requires_grad=old.requires_grad)
        else:
            module._buffers[pname] = new
    for mname, count in counts.items():
        _update_attributes(model.get_submodule(mname), count)
    _swap_attention(model)


def _sliced(mha: nn.MultiheadAttention) -> bool:
    """Whether ``mha``'s tensors no longer have the shapes its ``embed_dim``, ``kdim`` and ``vdim`` imply."""
    e = mha.embed_dim
    if mha.in_proj_weight is not None:
        shapes = [(mha.in_proj_weight, (3 * e, e))]
    else:
        shapes = [(mha.q_proj_weight, (e, e)), (mha.k_proj_weight, (e, mha.kdim)), (mha.v_proj_weight, (e, mha.vdim))]
    shapes.append((mha.out_proj.weight, (e, e)))
    return any(tuple(t.shape) != shape for t, shape in shapes)


def _swap_attention(model: nn.Module) -> None:
    """Put a PrunedMultiheadAttention in place of every nn.MultiheadAttention that lost heads or channels, which
    it cannot run with (embed_dim = num_heads * head_dim on every side); update the sizes of the others."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PrunedMultiheadAttention) and all(
                isinstance(getattr(module, p), nn.Linear) for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
            module.resized()
        elif isinstance(module, nn.MultiheadAttention) and _sliced(module):
            if not name:
                raise UnsupportedModelError("structured pruning of a bare nn.MultiheadAttention cannot replace the "
                                            "model itself; wrap it in a module")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, PrunedMultiheadAttention.from_attention(module))


def _update_attributes(module: nn.Module, count: int) -> None:
    """Make the layer's size attributes match its sliced tensors (``count``: its per-channel size)."""
    if isinstance(module, nn.RNNBase):
        module.hidden_size = module.weight_hh_l0.shape[1]
        module.input_size = module.weight_ih_l0.shape[1]
        module._init_flat_weights()  # the parameters were replaced behind nn.RNNBase's own bookkeeping
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):
        module.in_channels, module.out_channels = module.weight.shape[0], module.weight.shape[1] * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):
        w = module.weight
        if module.groups > 1 and module.groups == module.in_channels:  # depthwise: k outputs per input
            k = module.out_channels // module.in_channels
            module.out_channels = w.shape[0]
            module.in_channels = module.groups = w.shape[0] // k
        else:
            module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, nn.LayerNorm):
        module.normalized_shape = (count,) + tuple(module.normalized_shape[1:])
    elif isinstance(module, nn.PReLU):
        module.num_parameters = count
    elif isinstance(module, nn.GroupNorm):
        module.num_channels = count
    elif hasattr(module, "num_features"):
        module.num_features = count


def _output_shapes(model: nn.Module, example_inputs: tuple | dict) -> list[tuple[int, ...]]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = call_model(model, example_inputs)
    finally:
        for m, training in modes.items():
            m.training = training
    shapes: list[tuple[int, ...]] = []

    def collect(obj) -> None:
        if torch.is_tensor(obj):
            shapes.append(tuple(obj.shape))
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                collect(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                collect(o)

    collect(out)
    return shapes


def structured_prune(model: nn.Module, config: StructuredPruning, example_inputs, data: Iterable | None = None,
                     loss_fn: LossFn | str | None = None, ratio: float | dict[str, float] | None = None) -> dict:
    """Remove channels of ``model`` IN PLACE as ``config`` says and return a summary.

    ``ratio`` overrides ``config.ratio`` (a float, or {leading layer name: ratio}); ``example_inputs``
    (a tensor, a tuple of positional inputs or a dict of keyword inputs) is used to trace the model;
    ``data`` and ``loss_fn(outputs, batch)`` (default cross-entropy) feed ``importance="taylor"``.

    Returns ``{"groups": n, "pruned_groups": n, "removed_channels": {leader: [before, after]},
    "kept": {leader: [kept channel indices]}, "members": {leader: [coupled tensor slices as dicts]},
    "skipped": [{"group": leader, "reason": why}]}`` (plain data: JSON-serialisable). A group's channels are
    its slots: positions within a group for grouped convs, heads for attention split into heads.
    Groups skipped because of an op the tracer does not understand also raise a warning.
    """
    if not isinstance(config, StructuredPruning):
        raise ConfigError(f"structured_prune takes a StructuredPruning config, got {type(config).__name__}")
    if ratio is not None:
        config = config.replace(ratio=ratio)  # validates the override
    if config.scope == "global" and isinstance(config.ratio, dict):
        raise ConfigError("scope='global' ranks channels across groups with one overall ratio; use "
                          "scope='layer' for a per-layer ratio mapping")
    example_inputs = as_example_inputs(example_inputs)
    _check_model(model)
    before_shapes = _output_shapes(model, example_inputs)
    check_patterns("StructuredPruning.exclude", config.exclude, [n for n, _ in model.named_modules() if n])
    groups = build_groups(model, example_inputs, config.exclude)
    _report_left(model, groups, config)

    skipped = []
    for g in groups:
        if g.prunable:
            continue
        skipped.append({"group": g.leader, "reason": g.reason})
        if any(kind == UNSUPPORTED for kind, _ in g.reasons):
            warnings.warn(f"structured pruning leaves the channels of {g.leader!r} unpruned: {g.reason}",
                          stacklevel=2)
    ratios = _group_ratios(groups, config.ratio)
    chosen = [(g, r) for g, r in zip(groups, ratios) if g.prunable and r > 0 and g.size > 1]
    todo = [g for g, _ in chosen]
    scores = group_importance(model, todo, config.importance, data=data, loss_fn=loss_fn,
                              batches=config.importance_batches) if todo else []
    keeps = plan_keep(todo, scores, [r for _, r in chosen], config)
    apply_keep(model, todo, keeps)

    try:
        after_shapes = _output_shapes(model, example_inputs)
    except Exception as exc:  # a bug in the tracer's rules must not pass silently
        raise TorchslimError(f"the pruned model no longer runs ({type(exc).__name__}: {exc}); please report "
                             "this, and put the layers involved in exclude= to work around it") from exc
    if after_shapes != before_shapes:
        raise TorchslimError(f"structured pruning changed the model's output shapes {before_shapes} -> "
                             f"{after_shapes}; please report this and use exclude= on the output layers")

    pruned = [(g, k) for g, k in zip(todo, keeps) if len(k) < g.size]
    return {
        "groups": len(groups),
        "pruned_groups": len(pruned),
        "removed_channels": {g.leader: [g.size, len(k)] for g, k in pruned},
        "kept": {g.leader: k for g, k in pruned},
        "members": {g.leader: [dataclasses.asdict(m) for m in g.members] for g, _ in pruned},
        "skipped": skipped,
    }


def masked_like(original: nn.Module, summary: dict) -> nn.Module:
    """A copy of the unpruned ``original`` with the channels ``summary`` removed zeroed where they are
    produced (weight rows and bias of each producer, gamma and beta of each BatchNorm in the group, every gate
    row of a recurrent layer's hidden unit).

    In eval mode it computes what the pruned model computes (up to float rounding) as long as removed
    channels stay zero downstream (ReLU-like activations, no LayerNorm over channels): a correctness check.
    """
    masked = copy_model(original)
    for leader, keep in summary["kept"].items():
        members = [Member(**m) for m in summary["members"][leader]]
        removed = sorted(set(range(summary["removed_channels"][leader][0])) - set(keep))
        for m in members:
            if m.role in ("out", "norm") and ("weight" in m.param or "bias" in m.param) and removed:
                t = getattr(masked.get_submodule(m.module), m.param)
                idx = torch.tensor([m.offset + k * m.rep + j for k in removed for j in range(m.rep)])
                with torch.no_grad():
                    t.index_fill_(m.dim, idx.to(t.device), 0.0)
    return masked
