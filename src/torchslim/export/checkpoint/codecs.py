"""Module codecs: how a module whose type or shape changed since the factory built the model is recorded
(its constructor arguments) and rebuilt, and the codecs of the built-in torch modules.

Only modules that differ from what the factory builds are recorded, as ``{"type", "args", "children"}``
specs keyed by module path; ``load`` rebuilds them with the registered codec of that type name.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from ...core.errors import TorchslimError
from ...core.registry import Registry
from .encodings import ENCODINGS, Encoding
from .format import jsonable, plain


@dataclasses.dataclass(frozen=True)
class ModuleCodec:
    """Teaches checkpoints to rebuild modules of exactly type ``cls``.

    ``to_args(module)`` returns JSON-serialisable constructor arguments (shapes included);
    ``from_args(args)`` builds an equivalent module with the right parameter shapes (values are loaded
    afterwards). Child modules are recorded and rebuilt recursively, so containers need not describe
    them. ``name`` (the type name in the manifest) defaults to ``"<module>.<QualName>"``.
    """

    cls: type
    to_args: Callable[[nn.Module], dict[str, Any]]
    from_args: Callable[[dict[str, Any]], nn.Module]
    name: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.cls, type) and issubclass(self.cls, nn.Module)):
            raise TorchslimError(f"ModuleCodec: cls must be an nn.Module subclass, got {self.cls!r}")
        if not callable(self.to_args) or not callable(self.from_args):
            raise TorchslimError(f"ModuleCodec({self.cls.__name__}): to_args and from_args must be callables")
        if not self.name:
            object.__setattr__(self, "name", f"{self.cls.__module__}.{self.cls.__qualname__}")


def _add_module(codec: ModuleCodec, replace: bool = False) -> None:
    for other in MODULES.values():
        if other.cls is codec.cls and other.name != codec.name:
            raise TorchslimError(f"{codec.cls.__qualname__} is already registered as {other.name!r}")
    MODULES.add(codec.name, codec, replace=replace)


def register_module(cls: type, to_args: Callable[[nn.Module], dict[str, Any]],
                    from_args: Callable[[dict[str, Any]], nn.Module], *, name: str | None = None,
                    replace: bool = False) -> str:
    """Register a :class:`ModuleCodec` for ``cls`` and return its type name."""
    codec = ModuleCodec(cls, to_args, from_args, name)
    _add_module(codec, replace)
    return codec.name


def register_codecs(*codecs: ModuleCodec | Encoding) -> None:
    """Register module codecs and tensor encodings, e.g. a technique's ``CODECS``; duplicates are errors."""
    for codec in codecs:
        if isinstance(codec, ModuleCodec):
            _add_module(codec)
        elif isinstance(codec, Encoding):
            ENCODINGS.add(codec.name, codec)
        else:
            raise TorchslimError(f"register_codecs takes ModuleCodec and Encoding objects, got {codec!r}")


def codec_for(module: nn.Module) -> ModuleCodec | None:
    """The codec of ``module``'s exact type (a subclass may add behaviour the codec does not know about)."""
    for codec in MODULES.values():
        if type(module) is codec.cls:
            return codec
    return None


# ----------------------------------------------------------------------------------------------
# Recording and rebuilding changed modules


def join(prefix: str, name: str) -> str:
    """The path of child ``name`` of the module at ``prefix`` (``""`` is the root)."""
    return f"{prefix}.{name}" if prefix else name


@contextlib.contextmanager
def on_device(meta: bool) -> Iterator[None]:
    """Build modules on the meta device (no memory, no initialisation) when ``meta``."""
    if meta:
        with torch.device("meta"):
            yield
    else:
        yield


def _same_module(saved: nn.Module, ref: nn.Module | None) -> bool:
    if ref is None or type(saved) is not type(ref):
        return False
    codec = codec_for(saved)
    if codec is None:  # unregistered types are compared through their children and tensor shapes
        return True
    return plain(codec.to_args(saved)) == plain(codec.to_args(ref))


def diff_modules(model: nn.Module, fresh: nn.Module) -> dict[str, dict[str, Any]]:
    """Specs for the top-most modules whose type or constructor args differ from the fresh model."""
    specs: dict[str, dict[str, Any]] = {}

    def visit(path: str, saved: nn.Module, ref: nn.Module | None) -> None:
        if not _same_module(saved, ref):
            specs[path] = _spec_of(saved, path)
            return
        assert ref is not None
        if list(saved._modules) != list(ref._modules) and codec_for(saved) is not None:
            # Children were added: record the whole container, whose spec keeps their order (the manifest's
            # module paths are sorted, which would put a Sequential's "10" before "2").
            try:
                specs[path] = _spec_of(saved, path)
                return
            except TorchslimError:
                pass  # a child has no codec: record the changed children one by one
        for name, child in saved._modules.items():
            if child is not None:
                visit(join(path, name), child, ref._modules.get(name))
        for name, child in ref._modules.items():
            if child is not None and saved._modules.get(name) is None:
                raise TorchslimError(
                    f"module {join(path, name)!r} built by the factory is missing from the model; checkpoints record "
                    "replaced or added modules only: replace it with nn.Identity() instead of deleting it")

    visit("", model, fresh)
    return specs


def _spec_of(module: nn.Module, path: str) -> dict[str, Any]:
    codec = codec_for(module)
    cls = type(module)
    if codec is None:
        raise TorchslimError(
            f"module {path or '<root>'!r} ({cls.__module__}.{cls.__qualname__}) differs from what the factory builds "
            f"(new, replaced or reshaped), and checkpoints do not know how to rebuild a {cls.__qualname__}: call "
            f"torchslim.export.checkpoint.register_module({cls.__qualname__}, to_args, from_args) first")
    spec: dict[str, Any] = {"type": codec.name, "args": jsonable(codec.to_args(module), f"args of module {path!r}")}
    if module._modules:
        # A list of pairs, not a dict: Sequential runs its children in insertion order.
        spec["children"] = [[child_name, None if child is None else _spec_of(child, join(path, child_name))]
                            for child_name, child in module._modules.items()]
    return spec


def _build_spec(spec: Any, path: str, error: type[TorchslimError], where: str) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise error(f"{where}: malformed spec for module {path!r}: {spec!r}")
    type_name = spec["type"]
    if type_name not in MODULES:
        raise error(f"{where}: module {path or '<root>'!r} has type {type_name!r}, which this process cannot rebuild "
                    f"(no such type is registered). Register its codec (torchslim.export.checkpoint.register_codecs "
                    f"or register_module(cls, to_args, from_args, name={type_name!r})) before loading")
    codec = MODULES.get(type_name)
    try:
        module = codec.from_args(dict(spec.get("args") or {}))
    except Exception as exc:
        raise error(f"{where}: cannot rebuild module {path!r} of type {type_name!r} from {spec.get('args')!r}: "
                    f"{type(exc).__name__}: {exc}") from None
    for child_name, child_spec in spec.get("children") or []:
        child = None if child_spec is None else _build_spec(child_spec, join(path, child_name), error, where)
        module.add_module(child_name, child)
    return module


def _path_order(path: str) -> tuple:
    parts = path.split(".") if path else []
    # Numbered children (Sequential, ModuleList) in numeric order: 2 before 10.
    return (len(parts), [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts])


def apply_specs(model: nn.Module, specs: Mapping[str, Any], error: type[TorchslimError], where: str,
                meta: bool) -> nn.Module:
    """``model`` with the recorded modules rebuilt and put in place (the root too, for path ``""``)."""
    # Shallow paths first so a replaced parent never overwrites a replacement made inside it.
    for path in sorted(specs, key=_path_order):
        with on_device(meta):
            module = _build_spec(specs[path], path, error, where)
        if path == "":
            model = module
            continue
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            raise error(f"{where}: cannot place module {path!r}: its parent {parent_path!r} does not exist") from None
        parent.add_module(name, module)
    return model


# ----------------------------------------------------------------------------------------------
# Built-in torch modules


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _builtin(cls: type[nn.Module], *attrs: str, bias: bool = False) -> ModuleCodec:
    def to_args(module: nn.Module) -> dict[str, Any]:
        args = {a: plain(getattr(module, a)) for a in attrs}
        if bias:
            args["bias"] = getattr(module, "bias", None) is not None
        return args

    def from_args(args: dict[str, Any]) -> nn.Module:
        return cls(**{k: _tuples(v) for k, v in args.items()})

    return ModuleCodec(cls, to_args, from_args, name=cls.__name__)


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_RNN = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")

BUILTIN_MODULES = (
    _builtin(nn.Linear, "in_features", "out_features", bias=True),
    _builtin(nn.Conv1d, *_CONV, bias=True),
    _builtin(nn.Conv2d, *_CONV, bias=True),
    _builtin(nn.Conv3d, *_CONV, bias=True),
    *(_builtin(cls, *_CONV, "output_padding", bias=True)
      for cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)),
    _builtin(nn.BatchNorm1d, *_BN),
    _builtin(nn.BatchNorm2d, *_BN),
    _builtin(nn.BatchNorm3d, *_BN),
    _builtin(nn.GroupNorm, "num_groups", "num_channels", "eps", "affine"),
    _builtin(nn.LSTM, *_RNN, "proj_size"),  # structured pruning shrinks the hidden units
    _builtin(nn.GRU, *_RNN),
    _builtin(nn.RNN, *_RNN, "nonlinearity"),
    _builtin(nn.LayerNorm, "normalized_shape", "eps", "elementwise_affine", bias=True),
    _builtin(nn.Embedding, "num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
             "scale_grad_by_freq", "sparse"),
    _builtin(nn.Sequential),
    _builtin(nn.ModuleList),
    _builtin(nn.ModuleDict),
    _builtin(nn.Identity),
    _builtin(nn.ReLU, "inplace"),
    _builtin(nn.ReLU6, "inplace"),
    _builtin(nn.Flatten, "start_dim", "end_dim"),
    _builtin(nn.MaxPool2d, "kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    _builtin(nn.AvgPool2d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    _builtin(nn.AdaptiveAvgPool2d, "output_size"),
    _builtin(nn.Dropout, "p", "inplace"),
    _builtin(nn.PReLU, "num_parameters"),  # structured pruning shrinks it along with its channels
)

MODULES: Registry[str, ModuleCodec] = Registry("module type", {c.name: c for c in BUILTIN_MODULES})
"""Every module codec, by the type name the manifest records."""
