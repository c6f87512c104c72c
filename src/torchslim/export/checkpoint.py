"""torchslim's single-file checkpoint (``.slim``).

A checkpoint is one safetensors file. Its header metadata holds a JSON manifest under the key
``"torchslim"`` describing how to rebuild the model (a factory plus keyword arguments, plus the modules
whose type or shape changed since the factory built them), how each tensor is stored, which weights
carry pruning masks, and the compression history and metrics. Nothing is pickled: loading imports the
recorded factory and the registered module types, never code named only in the file's bytes.

Tensors are stored in whichever registered encoding is smallest ("dense", "bitmask" or "relative"
built in), so pruned weights take less room on disk. Two registries are the extension points that
quantization uses: :func:`register_encoding` for new tensor codings and :func:`register_module` for
new module types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import math
import os
from pathlib import Path
from typing import Sequence, Any, Callable, Iterator, Mapping, Optional

import numpy as np
import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import prune

from .._version import __version__
from ..core.errors import CheckpointError, TorchslimError
from ..core.files import atomic_write
from ..core.history import history as model_history

__all__ = [
    "save", "load", "read_manifest", "register_encoding", "register_module",
    "CheckpointExistsError", "FORMAT", "FORMAT_VERSION",
]

FORMAT = "torchslim"
FORMAT_VERSION = 1
MANIFEST_KEY = "torchslim"

# Parts of an encoded tensor are stored as "<name>::<part>"; the "data" part keeps the bare name so
# that dense tensors stay readable with plain safetensors tools.
_PART_SEP = "::"
_DATA_PART = "data"
# Every stored part also costs a safetensors header entry (name, dtype, shape, offsets); counting it
# keeps tiny tensors (biases) from being split into two parts that are together larger than one.
_PART_OVERHEAD = 64
_MAX_GAP = 255  # relative indices are uint8
_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
_RESERVED_ENTRY_KEYS = ("encoding", "shape", "dtype", "parts")
# Tried once when a checkpoint names an encoding or module type this process does not know.
_EXTENSION_MODULES = ("torchslim.quantization",)

Encoded = tuple[dict[str, torch.Tensor], dict[str, Any]]
EncodeFn = Callable[[torch.Tensor], Optional[Encoded]]
DecodeFn = Callable[[dict[str, torch.Tensor], dict[str, Any]], torch.Tensor]


class CheckpointExistsError(TorchslimError, FileExistsError):
    """The target path exists and ``overwrite=True`` was not passed."""


@dataclasses.dataclass(frozen=True)
class _Encoding:
    encode: EncodeFn
    decode: DecodeFn


@dataclasses.dataclass(frozen=True)
class _ModuleCodec:
    cls: type
    to_args: Callable[[nn.Module], dict[str, Any]]
    from_args: Callable[[dict[str, Any]], nn.Module]


# The only two pieces of global state: the extension registries.
_ENCODINGS: dict[str, _Encoding] = {}
_MODULES: dict[str, _ModuleCodec] = {}


# ----------------------------------------------------------------------------------------------
# Extension points


def register_encoding(name: str, encode: EncodeFn, decode: DecodeFn, *, replace: bool = False) -> None:
    """Register a lossless tensor encoding.

    ``encode(tensor)`` gets a detached, contiguous CPU tensor and returns ``(parts, meta)`` -- a dict
    of named CPU tensors to store and a dict of JSON-serialisable extras for the manifest entry -- or
    ``None`` when it does not apply to that tensor. ``decode(parts, entry)`` gets the same parts and
    the manifest entry (``shape``, ``dtype`` and the extras) and must return the exact tensor.
    Every registered encoding is tried for every tensor and the one with the fewest bytes wins, so an
    encoding must return ``None`` (cheaply) for tensors it is not meant for. Save checks the winner
    round-trips exactly.
    """
    if not isinstance(name, str) or not name or _PART_SEP in name:
        raise TorchslimError(f"encoding name must be a non-empty str without {_PART_SEP!r}, got {name!r}")
    if not callable(encode) or not callable(decode):
        raise TorchslimError(f"register_encoding({name!r}): encode and decode must be callables")
    if name in _ENCODINGS and not replace:
        raise TorchslimError(f"encoding {name!r} is already registered; pass replace=True to replace it")
    _ENCODINGS[name] = _Encoding(encode, decode)


def register_module(cls: type, to_args: Callable[[nn.Module], dict[str, Any]],
                    from_args: Callable[[dict[str, Any]], nn.Module], *, name: str | None = None,
                    replace: bool = False) -> str:
    """Teach checkpoints to rebuild modules of exactly type ``cls``; returns the registered name.

    ``to_args(module)`` returns JSON-serialisable constructor arguments (shapes included);
    ``from_args(args)`` builds an equivalent module with the right parameter shapes (values are loaded
    afterwards). Child modules are recorded and rebuilt recursively, so containers need not describe
    them. The name defaults to ``"<module>.<QualName>"``; a ``torchslim.*`` name lets ``load`` import
    the defining module by itself.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TorchslimError(f"register_module: cls must be an nn.Module subclass, got {cls!r}")
    if not callable(to_args) or not callable(from_args):
        raise TorchslimError(f"register_module({cls.__name__}): to_args and from_args must be callables")
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    if name in _MODULES and not replace:
        raise TorchslimError(f"module type {name!r} is already registered; pass replace=True to replace it")
    for other, codec in _MODULES.items():
        if codec.cls is cls and other != name:
            raise TorchslimError(f"{cls.__qualname__} is already registered as {other!r}")
    _MODULES[name] = _ModuleCodec(cls, to_args, from_args)
    return name


# ----------------------------------------------------------------------------------------------
# Public API


def save(model: nn.Module, path: str | os.PathLike, *, factory: str | Callable[..., nn.Module] | None = None,
         factory_kwargs: dict[str, Any] | None = None, history: list[dict] | None = None,
         metrics: dict[str, Any] | None = None, overwrite: bool = False,
         encodings: Sequence[str] | None = None) -> Path:
    """Write ``model`` to a single ``.slim`` file at ``path`` and return the path.

    The architecture is recorded as ``type(model)`` plus ``model.init_kwargs`` (torchslim's models
    have it) or, when given, ``factory`` ("pkg.module:callable" or the callable itself) plus
    ``factory_kwargs``. Modules whose type or shape differs from what the factory builds (structured
    pruning, low-rank factors) are recorded too. ``torch.nn.utils.prune`` masks are folded into the
    weights and re-applied by :func:`load`; ``model`` itself is not modified. The file is written
    atomically and an existing file is only replaced with ``overwrite=True``. ``encodings`` limits the
    registered tensor encodings save may choose from (``"dense"`` is always allowed); by default each
    tensor gets the smallest of all.
    """
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"save: expected an nn.Module, got {type(model).__name__}")
    path = Path(path)
    _check_target(path, overwrite)
    if history is None:  # what the technique verbs recorded on the model
        history = model_history(model)
    # Stage configs may be passed as Config objects; they are stored as their to_dict() form.
    history = [stage.to_dict() if hasattr(stage, "to_dict") else stage for stage in history]
    history = _jsonable(history, "history")
    for i, stage in enumerate(history):
        if not isinstance(stage, dict):
            raise TorchslimError(f"history[{i}] must be a dict (a stage config, e.g. cfg.to_dict()), "
                                 f"got {type(stage).__name__}")
    metrics = _jsonable(dict(metrics) if metrics is not None else {}, "metrics")

    factory_path, kwargs = _resolve_arch(model, factory, factory_kwargs)
    try:
        build = _import_factory(factory_path)
    except Exception as exc:
        raise TorchslimError(f"factory {factory_path!r} cannot be imported ({exc}); "
                             "pass factory='pkg.module:callable' that load() will be able to import") from None
    state, masked = _effective_state(model)

    fresh, on_meta = _instantiate(build, kwargs, factory_path, TorchslimError)
    if type(fresh) is not type(model):
        raise TorchslimError(f"factory {factory_path!r} builds a {type(fresh).__qualname__}, but the model is a "
                             f"{type(model).__qualname__}; pass the factory that builds this model")
    specs = _diff_modules(model, fresh)
    _check_rebuild(fresh, on_meta, specs, state, factory_path)

    allowed = None
    if encodings is not None:
        unknown = sorted(set(encodings) - set(_ENCODINGS))
        if unknown:
            raise TorchslimError(f"unknown encoding(s) {unknown}; registered: {sorted(_ENCODINGS)}")
        allowed = {"dense", *encodings}
    entries: dict[str, dict[str, Any]] = {}
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        entry, parts = _encode_tensor(name, tensor, allowed)
        entries[name] = entry
        for part, value in parts.items():
            key = _stored_name(name, part)
            if key in stored:
                raise TorchslimError(f"tensor name {key!r} is used twice; rename the module or the part")
            stored[key] = value

    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torchslim_version": __version__,
        "arch": {"factory": factory_path, "kwargs": kwargs},
        "modules": specs,
        "tensors": entries,
        "masked": masked,
        "sparsity": _sparsity(state),
        "training": model.training,
        "history": history,
        "metrics": metrics,
    }
    manifest["sha256"] = _digest(manifest, {k: _tensor_bytes(v) for k, v in stored.items()})
    blob = safetensors.torch.save(stored, metadata={MANIFEST_KEY: _canonical(manifest)})
    atomic_write(path, blob, overwrite=overwrite, exists_error=CheckpointExistsError)
    return path


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (verifying its sha256) and move it to ``map_location``.

    Pruning masks recorded at save time are re-applied with ``prune.custom_from_mask`` so the zeros
    stay zero during further training. Raises CheckpointError for missing, truncated, corrupted or
    tampered files and for architectures this process cannot rebuild.
    """
    path = Path(path)
    manifest, data = _read_verified(path)
    try:
        stored = safetensors.torch.load(data)
    except Exception as exc:
        raise CheckpointError(f"{path}: safetensors cannot read the tensor data ({exc}); the file is corrupted, "
                              "restore a good copy") from None
    state = _decode_all(manifest, stored, path)
    model = _build_for_load(manifest, path)
    _load_state(model, state, path, manifest)
    for full in _field(manifest, "masked", list, path):
        module_path, _, tensor_name = full.rpartition(".")
        try:
            module = model.get_submodule(module_path)
            prune.custom_from_mask(module, tensor_name, mask=getattr(module, tensor_name) != 0)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot re-apply the pruning mask of {full!r} ({exc})") from None
    model.train(bool(manifest.get("training", True)))
    return model.to(map_location)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Return the verified manifest of the checkpoint at ``path`` without building the model."""
    return _read_verified(Path(path))[0]


# ----------------------------------------------------------------------------------------------
# Architecture


def _resolve_arch(model: nn.Module, factory: str | Callable[..., nn.Module] | None,
                  factory_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    cls = type(model)
    if factory is not None:
        if isinstance(factory, str):
            factory_path = factory
        elif callable(factory):
            factory_path = _qualified_name(factory)
        else:
            raise TorchslimError(f"factory must be 'pkg.module:callable' or a callable, got {factory!r}")
        kwargs = factory_kwargs or {}
    elif isinstance(getattr(model, "init_kwargs", None), dict) and factory_kwargs is None:
        factory_path, kwargs = _qualified_name(cls), model.init_kwargs
    else:
        required = _required_params(cls)
        if required and factory_kwargs is None:
            raise TorchslimError(
                f"cannot record how to rebuild {cls.__qualname__}: its constructor needs {required} and the model "
                f"has no init_kwargs dict. Pass factory='pkg.module:callable' (e.g. "
                f"'{cls.__module__}:{cls.__qualname__}') with factory_kwargs={{...}}, or set model.init_kwargs")
        factory_path, kwargs = _qualified_name(cls), factory_kwargs or {}
    if not isinstance(kwargs, dict):
        raise TorchslimError(f"factory kwargs must be a dict, got {type(kwargs).__name__}")
    return factory_path, _jsonable(kwargs, "factory kwargs")


def _qualified_name(obj: Any) -> str:
    module, qual = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qual or "<locals>" in qual or "<lambda>" in qual:
        raise TorchslimError(f"{obj!r} is not importable by name (defined inside a function or a lambda), so a "
                             "checkpoint could not rebuild it; define it at module level or pass "
                             "factory='pkg.module:callable'")
    return f"{module}:{qual}"


def _required_params(cls: type) -> list[str]:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _import_factory(factory_path: str) -> Callable[..., nn.Module]:
    module_name, sep, qual = factory_path.partition(":")
    if not sep or not module_name or not qual:
        raise ValueError(f"expected 'pkg.module:QualName', got {factory_path!r}")
    obj: Any = importlib.import_module(module_name)
    for attr in qual.split("."):
        obj = getattr(obj, attr)
    if not callable(obj):
        raise TypeError(f"{factory_path} is not callable")
    return obj


@contextlib.contextmanager
def _device(on_meta: bool) -> Iterator[None]:
    if on_meta:
        with torch.device("meta"):
            yield
    else:
        yield


def _instantiate(build: Callable[..., nn.Module], kwargs: dict[str, Any], factory_path: str,
                 error: type[TorchslimError], *, try_meta: bool = True) -> tuple[nn.Module, bool]:
    """Call the factory, on the meta device when it works; never disturbs the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        if try_meta:
            try:
                with _device(True):
                    model = build(**kwargs)
                if isinstance(model, nn.Module):
                    return model, True
            except Exception:  # some factories need real tensors (e.g. load weights): build normally
                pass
        try:
            model = build(**kwargs)
        except Exception as exc:
            raise error(f"calling factory {factory_path}(**{kwargs!r}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise error(f"factory {factory_path} returned a {type(model).__name__}, not an nn.Module")
    return model, False


def _codec_for(module: nn.Module) -> tuple[str, _ModuleCodec] | None:
    # Exact type match: a subclass may add behaviour the registered codec does not know about.
    for name, codec in _MODULES.items():
        if type(module) is codec.cls:
            return name, codec
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _same_module(saved: nn.Module, ref: nn.Module | None) -> bool:
    if ref is None or type(saved) is not type(ref):
        return False
    found = _codec_for(saved)
    if found is None:  # unregistered types are compared through their children and tensor shapes
        return True
    to_args = found[1].to_args
    return _plain(to_args(saved)) == _plain(to_args(ref))


def _diff_modules(model: nn.Module, fresh: nn.Module) -> dict[str, dict[str, Any]]:
    """Specs for the top-most modules whose type or constructor args differ from the fresh model."""
    specs: dict[str, dict[str, Any]] = {}

    def visit(path: str, saved: nn.Module, ref: nn.Module | None) -> None:
        if not _same_module(saved, ref):
            specs[path] = _spec_of(saved, path)
            return
        assert ref is not None
        for name, child in saved._modules.items():
            if child is not None:
                visit(_join(path, name), child, ref._modules.get(name))
        for name, child in ref._modules.items():
            if child is not None and saved._modules.get(name) is None:
                raise TorchslimError(
                    f"module {_join(path, name)!r} built by the factory is missing from the model; checkpoints record "
                    "replaced or added modules only: replace it with nn.Identity() instead of deleting it")

    visit("", model, fresh)
    return specs


def _spec_of(module: nn.Module, path: str) -> dict[str, Any]:
    found = _codec_for(module)
    cls = type(module)
    if found is None:
        raise TorchslimError(
            f"module {path or '<root>'!r} ({cls.__module__}.{cls.__qualname__}) differs from what the factory builds "
            f"(new, replaced or reshaped), and checkpoints do not know how to rebuild a {cls.__qualname__}: call "
            f"torchslim.export.checkpoint.register_module({cls.__qualname__}, to_args, from_args) first")
    name, codec = found
    spec: dict[str, Any] = {"type": name, "args": _jsonable(codec.to_args(module), f"args of module {path!r}")}
    if module._modules:
        # A list of pairs, not a dict: Sequential runs its children in insertion order.
        spec["children"] = [[child_name, None if child is None else _spec_of(child, _join(path, child_name))]
                            for child_name, child in module._modules.items()]
    return spec


def _try_extension_imports(type_name: str | None = None) -> None:
    candidates = list(_EXTENSION_MODULES)
    if type_name and type_name.startswith("torchslim.") and "." in type_name:
        candidates.insert(0, type_name.rsplit(".", 1)[0])
    for module_name in candidates:
        with contextlib.suppress(ImportError):
            importlib.import_module(module_name)


def _build_spec(spec: Any, path: str, error: type[TorchslimError], where: str) -> nn.Module:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise error(f"{where}: malformed spec for module {path!r}: {spec!r}")
    type_name = spec["type"]
    if type_name not in _MODULES:
        _try_extension_imports(type_name)
    codec = _MODULES.get(type_name)
    if codec is None:
        hint = type_name.rsplit(".", 1)[0] if "." in type_name else "the torchslim extension that defines it"
        raise error(f"{where}: module {path or '<root>'!r} has type {type_name!r}, which this process cannot rebuild "
                    f"(no such type is registered). Import {hint} (which registers it) or call "
                    f"torchslim.export.checkpoint.register_module(cls, to_args, from_args, name={type_name!r}) "
                    "before loading")
    try:
        module = codec.from_args(dict(spec.get("args") or {}))
    except Exception as exc:
        raise error(f"{where}: cannot rebuild module {path!r} of type {type_name!r} from {spec.get('args')!r}: "
                    f"{type(exc).__name__}: {exc}") from None
    for child_name, child_spec in spec.get("children") or []:
        child = None if child_spec is None else _build_spec(child_spec, _join(path, child_name), error, where)
        module.add_module(child_name, child)
    return module


def _apply_specs(model: nn.Module, specs: Mapping[str, Any], error: type[TorchslimError], where: str,
                 on_meta: bool) -> nn.Module:
    # Shallow paths first so a replaced parent never overwrites a replacement made inside it.
    for path in sorted(specs, key=lambda p: (p != "", p.count("."), p)):
        with _device(on_meta):
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


def _check_rebuild(fresh: nn.Module, on_meta: bool, specs: dict[str, Any], state: dict[str, torch.Tensor],
                   factory_path: str) -> None:
    """Rebuild at save time what load will rebuild, so a checkpoint that saves also loads."""
    rebuilt = _apply_specs(fresh, specs, TorchslimError, "save", on_meta)
    shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes))
    mismatched = {k: (tuple(v.shape), shapes[k]) for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]}
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append("shape mismatch (model vs rebuilt) " + ", ".join(
                f"{k}: {a} vs {b}" for k, (a, b) in list(mismatched.items())[:5]))
        if missing:
            problems.append(f"tensors the rebuilt model has but the model lacks: {missing[:5]}")
        if unexpected:
            problems.append(f"tensors the rebuilt model lacks: {unexpected[:5]}")
        raise TorchslimError(
            f"cannot record the architecture: rebuilding it from {factory_path} and the recorded module changes gives "
            f"different tensors ({'; '.join(problems)}). A module changed shape without updating its constructor "
            "attributes (e.g. out_channels, in_features, num_features), or a custom module changed: register it with "
            "torchslim.export.checkpoint.register_module")


def _build_for_load(manifest: dict[str, Any], path: Path) -> nn.Module:
    arch = _field(manifest, "arch", dict, path)
    factory_path, kwargs = arch.get("factory"), arch.get("kwargs", {})
    if not isinstance(factory_path, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: malformed 'arch' in the manifest: {arch!r}")
    try:
        build = _import_factory(factory_path)
    except Exception as exc:
        raise CheckpointError(
            f"{path}: the model factory {factory_path!r} cannot be imported ({type(exc).__name__}: {exc}); install or "
            "put on sys.path the package that defines it (the same code that saved the checkpoint)") from None
    model, _ = _instantiate(build, kwargs, factory_path, CheckpointError, try_meta=False)
    return _apply_specs(model, _field(manifest, "modules", dict, path), CheckpointError, str(path), False)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, manifest: dict[str, Any]) -> None:
    # Modules are built in the default dtype; adopt the stored dtype in place so tied parameters stay tied.
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in state and tensor.dtype != state[name].dtype:
            tensor.data = tensor.data.to(state[name].dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise CheckpointError(
            f"{path}: the stored tensors do not fit the model rebuilt by {manifest['arch']['factory']} ({detail}); "
            "the factory's code probably changed since the checkpoint was written") from None


# ----------------------------------------------------------------------------------------------
# State dict, masks, sparsity


def _pruned_tensors(model: nn.Module) -> list[tuple[str, str]]:
    found = []
    for module_path, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append((module_path, hook._tensor_name))
    return found


def _effective_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict with prune reparametrisations folded (orig * mask under the plain name)."""
    raw = model.state_dict()
    folded: dict[str, str] = {}  # "<full>_orig" -> "<full>"
    for module_path, tensor_name in _pruned_tensors(model):
        full = _join(module_path, tensor_name)
        if f"{full}_orig" in raw and f"{full}_mask" in raw:
            folded[f"{full}_orig"] = full
    state: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if key in folded:
            full = folded[key]
            value = value * raw[f"{full}_mask"]
            key = full
        elif key.endswith("_mask") and key[: -len("_mask")] + "_orig" in folded:
            continue
        # Private copies: encoders may slice them freely and safetensors refuses shared storage.
        state[key] = value.detach().to("cpu", copy=True).contiguous()
    return state, sorted(folded.values())


def _sparsity(state: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for key, value in state.items():
        if (key == "weight" or key.endswith(".weight")) and value.is_floating_point() and value.dim() >= 2:
            zeros = value.numel() - int(torch.count_nonzero(value))
            out[key[: -len(".weight")] if "." in key else ""] = round(zeros / max(1, value.numel()), 6)
    return out


# ----------------------------------------------------------------------------------------------
# Tensor encodings


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_name(name: str, part: str) -> str:
    return name if part == _DATA_PART else f"{name}{_PART_SEP}{part}"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


def _encode_tensor(name: str, tensor: torch.Tensor, allowed: set[str] | None = None
                   ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    best: tuple[int, str, dict[str, torch.Tensor], dict[str, Any]] | None = None
    for enc_name, enc in _ENCODINGS.items():
        if allowed is not None and enc_name not in allowed:
            continue
        out = enc.encode(tensor)
        if out is None:
            continue
        parts, extra = out
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts.values()):
            raise TorchslimError(f"encoding {enc_name!r} returned no parts or a non-tensor part for {name!r}")
        cost = sum(_nbytes(p) + _PART_OVERHEAD for p in parts.values())
        if best is None or cost < best[0]:  # ties keep the earlier registered (dense first)
            best = (cost, enc_name, parts, extra)
    assert best is not None, "the dense encoding applies to every tensor"
    _, enc_name, parts, extra = best
    clash = [k for k in extra if k in _RESERVED_ENTRY_KEYS]
    if clash:
        raise TorchslimError(f"encoding {enc_name!r} uses reserved manifest keys {clash}")
    parts = {k: v.detach().cpu().contiguous() for k, v in parts.items()}
    # safetensors refuses parts that share storage (e.g. two slices of one tensor): give those their own.
    parts = {k: v if v.untyped_storage().nbytes() == _nbytes(v) else v.clone() for k, v in parts.items()}
    entry = {"encoding": enc_name, "shape": list(tensor.shape), "dtype": _dtype_name(tensor.dtype),
             "parts": sorted(parts), **_jsonable(extra, f"manifest entry of {name!r}")}
    # A lossy or buggy extension must fail here, not silently when the checkpoint is loaded.
    decoded = _ENCODINGS[enc_name].decode(dict(parts), entry)
    if not _same(decoded, tensor):
        raise TorchslimError(f"encoding {enc_name!r} does not reproduce tensor {name!r} exactly; this is a bug in "
                             "the extension that registered it")
    return entry, parts


def _decode_all(manifest: dict[str, Any], stored: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for name, entry in _field(manifest, "tensors", dict, path).items():
        enc_name = entry.get("encoding") if isinstance(entry, dict) else None
        if enc_name not in _ENCODINGS:
            _try_extension_imports()
        enc = _ENCODINGS.get(enc_name)  # type: ignore[arg-type]
        if enc is None:
            raise CheckpointError(f"{path}: tensor {name!r} uses encoding {enc_name!r}, which is not registered in this "
                                  "process; import the torchslim extension that provides it, then load again")
        try:
            parts = {p: stored[_stored_name(name, p)] for p in entry["parts"]}
            tensor = enc.decode(parts, entry)
            shape, dtype = list(tensor.shape), _dtype_name(tensor.dtype)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot decode tensor {name!r} ({entry.get('encoding')}): "
                                  f"{type(exc).__name__}: {exc}; the file is corrupted") from None
        if shape != entry.get("shape") or dtype != entry.get("dtype"):
            raise CheckpointError(f"{path}: tensor {name!r} decodes to {dtype}{shape}, but the manifest says "
                                  f"{entry.get('dtype')}{entry.get('shape')}; the file is corrupted")
        state[name] = tensor
    return state


def _sparse_candidate(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


def _encode_dense(t: torch.Tensor) -> Encoded:
    return {_DATA_PART: t}, {}


def _decode_dense(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    return parts[_DATA_PART].reshape(entry["shape"])


def _encode_bitmask(t: torch.Tensor) -> Encoded | None:
    if not _sparse_candidate(t):
        return None
    flat = t.reshape(-1)
    nonzero = flat != 0  # NaN counts as non-zero; -0.0 becomes +0.0, equal under torch.equal
    mask = torch.from_numpy(np.packbits(nonzero.numpy()))
    return {"mask": mask, "values": flat[nonzero]}, {}


def _decode_bitmask(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    n = math.prod(entry["shape"])
    mask = torch.from_numpy(np.unpackbits(parts["mask"].numpy(), count=n).astype(bool))
    values = parts["values"]
    out = torch.zeros(n, dtype=values.dtype)
    out[mask] = values
    return out.reshape(entry["shape"])


def _encode_relative(t: torch.Tensor) -> Encoded | None:
    """Deep Compression's relative indexing: uint8 gaps between non-zeros, a filler zero per 255 gap."""
    if not _sparse_candidate(t):
        return None
    flat = t.reshape(-1)
    pos = torch.nonzero(flat != 0).reshape(-1)
    gaps_to = torch.diff(pos, prepend=torch.tensor([-1], dtype=pos.dtype))
    fillers = (gaps_to - 1) // _MAX_GAP
    slot = torch.cumsum(fillers + 1, 0) - 1  # where each real non-zero lands among the entries
    total = int(slot[-1]) + 1 if slot.numel() else 0
    gaps = torch.full((total,), _MAX_GAP, dtype=torch.uint8)  # filler entries keep the full gap ...
    values = torch.zeros(total, dtype=t.dtype)  # ... and a zero value
    gaps[slot] = (gaps_to - fillers * _MAX_GAP).to(torch.uint8)
    values[slot] = flat[pos]
    return {"gaps": gaps, "values": values}, {}


def _decode_relative(parts: dict[str, torch.Tensor], entry: dict[str, Any]) -> torch.Tensor:
    gaps, values = parts["gaps"], parts["values"]
    out = torch.zeros(math.prod(entry["shape"]), dtype=values.dtype)
    if gaps.numel():
        out[torch.cumsum(gaps.to(torch.int64), 0) - 1] = values
    return out.reshape(entry["shape"])


# ----------------------------------------------------------------------------------------------
# File format: hashing, header parsing, atomic writes


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _digest(manifest: dict[str, Any], raw: Mapping[str, Any]) -> str:
    h = hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "sha256"}).encode())
    for name in sorted(raw):
        h.update(raw[name])
    return h.hexdigest()


def _parse_header(data: bytes, path: Path) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header ourselves, to tell truncated files from foreign ones."""
    not_safetensors = (f"{path} is not a safetensors file (so not a torchslim checkpoint); check the path, or "
                       "re-create it with torchslim.export.checkpoint.save")
    if len(data) < 8:
        raise CheckpointError(f"{path} is only {len(data)} bytes long: truncated, or not a torchslim checkpoint")
    n = int.from_bytes(data[:8], "little")
    if n == 0 or n > _MAX_HEADER or (len(data) > 8 and data[8:9] != b"{"):
        raise CheckpointError(not_safetensors)
    if 8 + n > len(data):
        raise CheckpointError(f"{path} is truncated: its header needs {8 + n} bytes but the file has {len(data)}; "
                              "it was cut short (interrupted copy or download), restore a complete copy")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(not_safetensors + " (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(not_safetensors)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: malformed safetensors header entry for {name!r}; the file is corrupted")
        end = max(end, offsets[1])
    have = len(data) - 8 - n
    if have < end:
        raise CheckpointError(f"{path} is truncated: the tensor data needs {end} bytes but only {have} are present; "
                              "it was cut short (interrupted copy or download), restore a complete copy")
    if have > end:
        raise CheckpointError(f"{path} has {have - end} unexpected bytes after the tensor data; the file is corrupted")
    return header, 8 + n


def _field(manifest: dict[str, Any], key: str, kind: type, path: Path) -> Any:
    value = manifest.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: manifest field {key!r} is missing or not a {kind.__name__}; the file was not "
                              "written by a compatible torchslim")
    return value


def _read_verified(path: Path) -> tuple[dict[str, Any], bytes]:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path (saved with "
                              "torchslim.export.checkpoint.save?)")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a directory?); pass the .slim file itself")
    data = path.read_bytes()
    header, start = _parse_header(data, path)
    metadata = header.get("__metadata__") or {}
    text = metadata.get(MANIFEST_KEY) if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise CheckpointError(f"{path} is a safetensors file but has no torchslim manifest (metadata key "
                              f"{MANIFEST_KEY!r}), so it was not written by torchslim.export.checkpoint.save; read "
                              "its raw tensors with safetensors.torch.load_file instead")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the torchslim manifest is not valid JSON; the file is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: the manifest does not declare format {FORMAT!r}; not a torchslim checkpoint")
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r} in the manifest; the file is corrupted")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} uses checkpoint format_version {version}, newer than this torchslim ({__version__}) supports "
            f"(up to {FORMAT_VERSION}; written by torchslim {manifest.get('torchslim_version')}); upgrade torchslim")
    view = memoryview(data)
    raw = {name: view[start + info["data_offsets"][0]: start + info["data_offsets"][1]]
           for name, info in header.items() if name != "__metadata__"}
    try:
        actual = _digest(manifest, raw)
    except ValueError:  # the manifest holds NaN/inf, which save never writes
        actual = None
    if actual is None or actual != manifest.get("sha256"):
        raise CheckpointError(f"{path} failed its sha256 check: the file was tampered with or corrupted after it was "
                              "written; restore a good copy or re-create it from the original model")
    return manifest, data


def _check_target(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise TorchslimError(f"cannot save to {path}: it is a directory; pass a file path such as {path / 'model.slim'}")
    if path.exists() and not overwrite:
        raise CheckpointExistsError(f"refusing to overwrite existing file {path}; pass overwrite=True to replace it")


# ----------------------------------------------------------------------------------------------
# JSON helpers


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _jsonable(value: Any, where: str) -> Any:
    """Check ``value`` is plain JSON (tuples become lists), naming the offending item otherwise."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise TorchslimError(f"{where} is {value}, which JSON cannot hold portably; store None or a string instead")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TorchslimError(f"{where} has key {k!r} of type {type(k).__name__}; manifest keys must be str")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    raise TorchslimError(f"{where} is a {type(value).__name__}, which is not JSON-serialisable; use str, int, float, "
                         "bool, None, lists and str-keyed dicts (call .item() or .tolist() on tensors and arrays)")


# ----------------------------------------------------------------------------------------------
# Built-in registrations


register_encoding("dense", _encode_dense, _decode_dense)
register_encoding("bitmask", _encode_bitmask, _decode_bitmask)
register_encoding("relative", _encode_relative, _decode_relative)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _register_builtin(cls: type[nn.Module], *attrs: str, bias: bool = False) -> None:
    def to_args(module: nn.Module) -> dict[str, Any]:
        args = {a: _plain(getattr(module, a)) for a in attrs}
        if bias:
            args["bias"] = getattr(module, "bias", None) is not None
        return args

    def from_args(args: dict[str, Any]) -> nn.Module:
        return cls(**{k: _tuples(v) for k, v in args.items()})

    register_module(cls, to_args, from_args, name=cls.__name__)


_CONV = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
_BN = ("num_features", "eps", "momentum", "affine", "track_running_stats")
_register_builtin(nn.Linear, "in_features", "out_features", bias=True)
_register_builtin(nn.Conv1d, *_CONV, bias=True)
_register_builtin(nn.Conv2d, *_CONV, bias=True)
_register_builtin(nn.BatchNorm1d, *_BN)
_register_builtin(nn.BatchNorm2d, *_BN)
_register_builtin(nn.LayerNorm, "normalized_shape", "eps", "elementwise_affine", bias=True)
_register_builtin(nn.Embedding, "num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
                  "scale_grad_by_freq", "sparse")
_register_builtin(nn.Sequential)
_register_builtin(nn.ModuleList)
_register_builtin(nn.Identity)
_register_builtin(nn.ReLU, "inplace")
_register_builtin(nn.ReLU6, "inplace")
_register_builtin(nn.Flatten, "start_dim", "end_dim")
_register_builtin(nn.MaxPool2d, "kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode")
_register_builtin(nn.AvgPool2d, "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                  "divisor_override")
_register_builtin(nn.AdaptiveAvgPool2d, "output_size")
_register_builtin(nn.Dropout, "p", "inplace")
_register_builtin(nn.PReLU, "num_parameters")  # structured pruning shrinks it along with its channels
