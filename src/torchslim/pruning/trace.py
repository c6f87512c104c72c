"""Tracing a model with ``torch.fx`` for the channel-dependency builder, and the groups it produces."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from ..core.errors import UnsupportedModelError
from ..data.batches import as_example_inputs
from ..nn.modules import match
from .layout import EXCLUDED, INPUT, OUTPUT, UNSUPPORTED, Member
from .oprules import traced_whole

__all__ = ["Member", "Group", "trace_model", "OUTPUT", "INPUT", "UNSUPPORTED", "EXCLUDED"]

@dataclasses.dataclass
class Group:
    """Coupled channels pruned together. ``leader`` is the first layer (in execution order) whose output
    channels belong to the group; ``reasons`` lists ``(kind, why)`` pairs that make it unprunable."""

    leader: str
    size: int
    members: list[Member]
    reasons: list[tuple[str, str]]

    @property
    def prunable(self) -> bool:
        return not self.reasons

    @property
    def reason(self) -> str:
        """Why the group is not pruned ("" when it is prunable)."""
        return "; ".join(dict.fromkeys(why for _, why in self.reasons))

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(m.module for m in self.members))

    def details(self) -> str:
        """Readable multi-line description: the layers and dims involved and why it is skipped, if it is."""
        state = "prunable" if self.prunable else f"NOT prunable: {self.reason}"
        lines = [f"group led by {self.leader!r} ({self.size} channels), {state}"]
        lines += [f"  {m.describe()}" for m in self.members]
        return "\n".join(lines)


class _Tracer(fx.Tracer):
    """Keeps excluded modules opaque, so excluding an untraceable submodule lets the rest be traced, and
    modules with a user-registered op rule, so that the rule sees them."""

    def __init__(self, exclude: tuple[str, ...]):
        super().__init__()
        self.exclude = exclude

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (super().is_leaf_module(m, module_qualified_name)
                or (bool(module_qualified_name) and match(module_qualified_name, self.exclude) is not None)
                or traced_whole(m))


def _unbound_defaults(model: nn.Module, example_inputs: tuple | dict) -> dict[str, Any]:
    """Forward parameters ``example_inputs`` leaves out that have a default: traced as those constants, so
    that ``if mask is not None:`` in a forward does not stop the tracer."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    given = set(example_inputs) if isinstance(example_inputs, dict) else set(list(params)[:len(example_inputs)])
    return {n: p.default for n, p in params.items() if n not in given and p.default is not p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _placeholder_args(gm: fx.GraphModule, example_inputs: tuple | dict) -> tuple:
    """``example_inputs`` as the positional arguments of the traced graph (keyword inputs by name)."""
    if not isinstance(example_inputs, dict):
        return tuple(example_inputs)
    args = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        name = str(node.target).lstrip("*")
        if name in example_inputs:
            args.append(example_inputs[name])
        elif node.args:
            args.append(node.args[0])
        else:
            raise UnsupportedModelError(f"example_inputs lacks {name!r}, an input of {type(gm).__name__}'s forward "
                                        f"without a default; given: {sorted(example_inputs)}")
    return tuple(args)


def trace_model(model: nn.Module, example_inputs: tuple | dict, exclude: tuple[str, ...] = ()) -> fx.GraphModule:
    """Symbolically trace ``model`` and record tensor shapes from one eval-mode run on ``example_inputs``
    (a tuple of positional inputs or a dict of keyword inputs).

    The GraphModule shares ``model``'s submodules; the run changes no state (eval mode, no grad).
    """
    name = type(model).__name__
    example_inputs = as_example_inputs(example_inputs)
    try:
        tracer = _Tracer(tuple(exclude))
        graph = tracer.trace(model, concrete_args=_unbound_defaults(model, example_inputs) or None)
        gm = fx.GraphModule(tracer.root, graph, name)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError...)
        raise UnsupportedModelError(
            f"structured pruning could not trace {name} with torch.fx: {type(exc).__name__}: {exc}. "
            "The forward must be symbolically traceable (no Python control flow on tensor values, no "
            "data-dependent shapes). Put the offending submodule in exclude= (it is then kept whole and "
            "treated as opaque) or rewrite it to be traceable.") from exc
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*_placeholder_args(gm, example_inputs))
    except Exception as exc:
        raise UnsupportedModelError(
            f"running traced {name} on example_inputs failed: {type(exc).__name__}: {exc}. Pass "
            "example_inputs=(a batch the model accepts,)") from exc
    finally:
        for m, training in modes.items():
            m.training = training
    return gm
