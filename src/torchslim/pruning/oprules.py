"""Op rules of the channel tracer: how each traced op carries, couples or blocks channels.

A rule is called once per graph node the tracer meets, as ``rule(tracer, node, module, name)``:
``node`` is the ``torch.fx`` node, ``module`` and ``name`` the called module and its qualified name
(``None`` for function and method calls). Rules are keyed by module class (looked up along the class's
bases), by function (the ``call_function`` target) or by method name (a ``str``). A rule expresses the op
through the tracer's primitives, which take care of bookkeeping and blocking:

- ``tracer.conv(node, module, x, name)`` / ``tracer.linear(...)``: a producer with its own output channels;
- ``tracer.per_channel(node, x, dim, params, name)``: one value per channel (dim 0 of each tensor in ``params``);
- ``tracer.layer_norm(node, module, x, name)``, ``tracer.elementwise(node)``, ``tracer.spatial(node, x, dims)``,
  ``tracer.cat(node, parts, dim)``, ``tracer.flatten(node, x, start, end)``, ``tracer.reshape(node, x)``,
  ``tracer.reduce(node, x)``;
- ``tracer.unknown(node, why)``: keep every channel the op touches.

``x`` is the node's tensor input (``node.args[0]``) and ``tracer.shape(x)`` its shape. Nodes without a rule
keep their channels (the safe default). :func:`register_op_rule` adds a rule; :func:`elementwise`,
:func:`per_channel` and :func:`submodule` cover the usual custom layers.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..core.errors import ConfigError
from ..core.registry import Registry
from .seqrules import SEQUENCE_RULES, handles_tuples

if TYPE_CHECKING:
    from .graph import _Builder

__all__ = ["OpRule", "register_op_rule", "elementwise", "per_channel", "submodule", "module_rule", "call_rule",
           "traced_whole", "node_arg", "handles_tuples"]

OpRule = Callable[["_Builder", fx.Node, Optional[nn.Module], Optional[str]], None]


def node_arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of the call, or keyword ``name``, or ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _input(node: fx.Node) -> Any:
    return node.args[0] if node.args else None


# -- rules for custom layers ----------------------------------------------------------------------
def elementwise(tracer: _Builder, node: fx.Node, module: nn.Module | None = None, name: str | None = None) -> None:
    """Rule: every channel stays where it is (activations, dropout, broadcasting arithmetic); tensor inputs
    whose channels line up are coupled."""
    tracer.elementwise(node)


def per_channel(*params: str, dim: int = 1) -> OpRule:
    """Rule for a layer holding one value per channel (channels along ``dim`` of its input) in each of
    ``params`` (dim 0 of those tensors), e.g. a learned channel scale: pruning a channel drops its entries."""
    if not params or not all(isinstance(p, str) and p for p in params):
        raise ConfigError(f"per_channel needs the names of the layer's per-channel tensors, e.g. "
                          f"per_channel('scale'), got {params!r}; use elementwise for a layer without any")

    def rule(tracer: _Builder, node: fx.Node, module: nn.Module | None, name: str | None) -> None:
        tracer.per_channel(node, _input(node), dim, list(params), name)

    return rule


def submodule(path: str) -> OpRule:
    """Rule for a wrapper whose output channels are those of its submodule ``path`` (e.g. a conv wrapper
    computing ``F.conv2d`` from ``self.conv``'s weight): the submodule's own rule applies to the wrapper's
    call, and pruning resizes the submodule."""

    def rule(tracer: _Builder, node: fx.Node, module: nn.Module | None, name: str | None) -> None:
        inner = module.get_submodule(path)
        inner_rule = module_rule(inner)
        if inner_rule is None:
            tracer.unknown(node, f"{name}.{path} ({type(inner).__name__}) has no op rule")
        else:
            inner_rule(tracer, node, inner, f"{name}.{path}")

    return rule


# -- built-in rules -------------------------------------------------------------------------------
def _conv(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    tracer.conv(node, module, _input(node), name)


def _linear(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    tracer.linear(node, module, _input(node), name)


def _batch_norm(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    params = [p for p in ("weight", "bias", "running_mean", "running_var") if getattr(module, p, None) is not None]
    tracer.per_channel(node, _input(node), 1, params, name)


def _layer_norm(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    tracer.layer_norm(node, module, _input(node), name)


def _prelu(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    if module.num_parameters == 1:
        tracer.elementwise(node)
    else:
        tracer.per_channel(node, _input(node), 1, ["weight"], name)


def _spatial(dims: int) -> OpRule:
    def rule(tracer: _Builder, node: fx.Node, module: nn.Module | None, name: str | None) -> None:
        tracer.spatial(node, _input(node), dims)

    return rule


def _resize(tracer: _Builder, node: fx.Node, module: nn.Module | None, name: str | None) -> None:
    x = _input(node)
    tracer.spatial(node, x, len(tracer.shape(x)) - 2)


def _flatten_module(tracer: _Builder, node: fx.Node, module: nn.Module, name: str) -> None:
    tracer.flatten(node, _input(node), module.start_dim, module.end_dim)


def _flatten_call(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    tracer.flatten(node, _input(node), node_arg(node, 1, "start_dim", 0), node_arg(node, 2, "end_dim", -1))


def _cat(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    tracer.cat(node, list(node_arg(node, 0, "tensors")), node_arg(node, 1, "dim", 0))


def _reshape(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    sizes = list(node.args[1:]) if node.op == "call_method" else [node_arg(node, 1, "shape")]
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = list(sizes[0])
    tracer.reshape(node, _input(node), sizes)


def _reduce(tracer: _Builder, node: fx.Node, module: None, name: None) -> None:
    tracer.reduce(node, _input(node))


_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Identity, nn.Dropout,
    nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.maximum, torch.minimum, torch.neg, torch.abs,
    torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
)
_ELEMENTWISE_METHODS = (
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "neg", "abs", "relu", "relu_", "sigmoid",
    "tanh", "clamp", "clamp_", "contiguous", "clone", "detach", "float", "half", "double", "to", "type_as",
)
_SPATIAL = (  # (module class, function, number of trailing spatial dims)
    (nn.MaxPool1d, F.max_pool1d, 1), (nn.MaxPool2d, F.max_pool2d, 2), (nn.MaxPool3d, F.max_pool3d, 3),
    (nn.AvgPool1d, F.avg_pool1d, 1), (nn.AvgPool2d, F.avg_pool2d, 2), (nn.AvgPool3d, F.avg_pool3d, 3),
    (nn.AdaptiveAvgPool1d, F.adaptive_avg_pool1d, 1), (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d, 2),
    (nn.AdaptiveAvgPool3d, F.adaptive_avg_pool3d, 3), (nn.AdaptiveMaxPool1d, F.adaptive_max_pool1d, 1),
    (nn.AdaptiveMaxPool2d, F.adaptive_max_pool2d, 2), (nn.AdaptiveMaxPool3d, F.adaptive_max_pool3d, 3),
)
_REDUCTIONS = ("mean", "sum", "amax", "amin")

BUILTIN_RULES: tuple[tuple[Any, OpRule], ...] = (
    (nn.Conv1d, _conv), (nn.Conv2d, _conv), (nn.Conv3d, _conv),  # transposed convs: seqrules
    (nn.Linear, _linear),
    (nn.modules.batchnorm._BatchNorm, _batch_norm), (nn.modules.instancenorm._InstanceNorm, _batch_norm),
    (nn.LayerNorm, _layer_norm),
    (nn.PReLU, _prelu),
    *((cls, elementwise) for cls in _ELEMENTWISE_MODULES),
    *((cls, _spatial(dims)) for cls, _, dims in _SPATIAL),
    (nn.Upsample, _resize),
    (nn.Flatten, _flatten_module),
    *((f, elementwise) for f in _ELEMENTWISE_FUNCTIONS),
    *((f, _spatial(dims)) for _, f, dims in _SPATIAL),
    (F.interpolate, _resize),
    (torch.cat, _cat), (torch.concat, _cat), (torch.concatenate, _cat),
    (torch.flatten, _flatten_call), (torch.reshape, _reshape),
    *((getattr(torch, r), _reduce) for r in _REDUCTIONS),
    *((m, elementwise) for m in _ELEMENTWISE_METHODS),
    ("view", _reshape), ("reshape", _reshape), ("flatten", _flatten_call),
    *((r, _reduce) for r in _REDUCTIONS),
    *SEQUENCE_RULES,
)
"""The tracer's built-in rules, keyed by module class, function or method name."""

OP_RULES: Registry[Any, OpRule] = Registry("op rule")
for _target, _rule in BUILTIN_RULES:
    OP_RULES.add(_target, _rule)
_BUILTIN_TARGETS = frozenset(target for target, _ in BUILTIN_RULES)


def register_op_rule(target: type[nn.Module] | Callable | str, rule: OpRule, *, replace: bool = False) -> OpRule:
    """Teach the channel tracer an op: ``target`` is a module class (its subclasses included), a function
    that ``torch.fx`` records as one call (a torch function, or your own wrapped with ``torch.fx.wrap``) or a
    tensor method name; ``rule(tracer, node, module, name)`` as described in this module, typically
    :func:`elementwise`, ``per_channel("scale")`` or ``submodule("conv")``.

    Modules of a registered class are traced as one call (not traced into), so the rule sees them whole.
    Registering a target twice raises ConfigError unless ``replace=True``. Returns ``rule``.
    """
    if not (isinstance(target, str) or callable(target)):
        raise ConfigError(f"register_op_rule: target must be a module class, a function or a method name, "
                          f"got {target!r}")
    if isinstance(target, type) and not issubclass(target, nn.Module):
        raise ConfigError(f"register_op_rule: class {target.__name__!r} is not an nn.Module; pass a module "
                          "class, a function or a method name")
    if not callable(rule):
        raise ConfigError(f"register_op_rule: rule must be callable as rule(tracer, node, module, name), "
                          f"got {rule!r}")
    return OP_RULES.add(target, rule, replace=replace)


def module_rule(module: nn.Module) -> OpRule | None:
    """The rule for ``module``: the one registered for its class or the nearest base class, or None."""
    for cls in type(module).__mro__:
        if cls in OP_RULES:
            return OP_RULES.get(cls)
    return None


def call_rule(target: Callable | str) -> OpRule | None:
    """The rule for a function or method name, or None."""
    try:
        return OP_RULES.get(target) if target in OP_RULES else None
    except TypeError:  # an unhashable call target has no rule
        return None


def traced_whole(module: nn.Module) -> bool:
    """Whether a rule registered by :func:`register_op_rule` covers ``module``: the tracer then records
    it as one call instead of tracing into its forward. Built-in rules cover torch layers, which torch.fx
    keeps whole anyway (user subclasses of them are traced into as before), and torchslim's own layers."""
    return any(cls in OP_RULES and (cls not in _BUILTIN_TARGETS or not cls.__module__.startswith("torch."))
               for cls in type(module).__mro__)
