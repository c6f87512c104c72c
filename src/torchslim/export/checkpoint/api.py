"""Saving and loading ``.slim`` checkpoints, and reading their manifest."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import safetensors.torch
import torch
from torch import nn
from torch.nn.utils import prune

from ..._version import __version__
from ...core.errors import CheckpointError, TorchslimError
from ...core.files import atomic_write
from ...core.history import history as model_history
from ...nn.masks import effective_state
from .codecs import apply_specs, diff_modules, on_device
from .encodings import ENCODINGS, decode_all, encode_tensor, stored_name
from .format import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST_KEY,
    CheckpointExistsError,
    canonical,
    check_target,
    digest,
    field,
    jsonable,
    read_verified,
    tensor_bytes,
)


def save(model: nn.Module, path: str | os.PathLike, *, factory: str | Callable[..., nn.Module] | None = None,
         factory_kwargs: dict[str, Any] | None = None, history: list[dict] | None = None,
         metrics: dict[str, Any] | None = None, overwrite: bool = False,
         encodings: Sequence[str] | None = None, allow_nonfinite: bool = False) -> Path:
    """Write ``model`` to a single ``.slim`` file at ``path`` and return the path.

    The architecture is recorded as ``type(model)`` plus ``model.init_kwargs`` (torchslim's models
    have it) or, when given, ``factory`` ("pkg.module:callable" or the callable itself) plus
    ``factory_kwargs``. Modules whose type or shape differs from what the factory builds (structured
    pruning, low-rank factors) are recorded too. ``torch.nn.utils.prune`` masks are folded into the
    weights and re-applied by :func:`load`; ``model`` itself is not modified. The file is written
    atomically and an existing file is only replaced with ``overwrite=True``. ``encodings`` limits the
    registered tensor encodings save may choose from (``"dense"`` is always allowed); by default each
    tensor gets the smallest of all. A NaN/inf tensor is refused unless ``allow_nonfinite``.
    """
    if not isinstance(model, nn.Module):
        raise TorchslimError(f"save: expected an nn.Module, got {type(model).__name__}")
    path = Path(path)
    check_target(path, overwrite)
    # Stage configs may be passed as Config objects; they are stored as their to_dict() form.
    if history is None:  # what the technique verbs recorded on the model
        history = model_history(model)
    history = [stage.to_dict() if hasattr(stage, "to_dict") else stage for stage in history]
    history = jsonable(history, "history")
    for i, stage in enumerate(history):
        if not isinstance(stage, dict):
            raise TorchslimError(f"history[{i}] must be a dict (a stage config, e.g. cfg.to_dict()), "
                                 f"got {type(stage).__name__}")
    metrics = jsonable(dict(metrics) if metrics is not None else {}, "metrics")

    factory_path, kwargs = _resolve_arch(model, factory, factory_kwargs)
    try:
        build = _import_factory(factory_path)
    except Exception as exc:
        raise TorchslimError(f"factory {factory_path!r} cannot be imported ({exc}); "
                             "pass factory='pkg.module:callable' that load() will be able to import") from None
    folded, masked = effective_state(model)
    # Private copies: encoders may slice them freely and safetensors refuses shared storage.
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in folded.items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None and not allow_nonfinite:
        raise CheckpointError(f"save: tensor {bad!r} has NaN/inf values (a diverged run?); fix or retrain the "
                              "model, or pass allow_nonfinite=True to save it anyway")

    fresh, on_meta = _instantiate(build, kwargs, factory_path, TorchslimError)
    if type(fresh) is not type(model):
        raise TorchslimError(f"factory {factory_path!r} builds a {type(fresh).__qualname__}, but the model is a "
                             f"{type(model).__qualname__}; pass the factory that builds this model")
    specs = diff_modules(model, fresh)
    _check_rebuild(fresh, on_meta, specs, state, factory_path)

    allowed = None
    if encodings is not None:
        unknown = sorted(set(encodings) - set(ENCODINGS))
        if unknown:
            raise TorchslimError(f"unknown encoding(s) {unknown}; registered: {sorted(ENCODINGS)}")
        allowed = {"dense", *encodings}
    entries: dict[str, dict[str, Any]] = {}
    stored: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        entry, parts = encode_tensor(name, tensor, allowed)
        entries[name] = entry
        for part, value in parts.items():
            key = stored_name(name, part)
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
    manifest["sha256"] = digest(manifest, {k: tensor_bytes(v) for k, v in stored.items()})
    blob = safetensors.torch.save(stored, metadata={MANIFEST_KEY: canonical(manifest)})
    atomic_write(path, blob, overwrite=overwrite, exists_error=CheckpointExistsError)
    return path


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model saved at ``path`` (verifying its sha256) and move it to ``map_location``.

    Pruning masks recorded at save time are re-applied with ``prune.custom_from_mask`` so the zeros
    stay zero during further training. Raises CheckpointError for missing, truncated, corrupted or
    tampered files and for architectures this process cannot rebuild.
    """
    path = Path(path)
    manifest, data = read_verified(path)
    try:
        stored = safetensors.torch.load(data)
    except Exception as exc:
        raise CheckpointError(f"{path}: safetensors cannot read the tensor data ({exc}); the file is corrupted, "
                              "restore a good copy") from None
    state = decode_all(manifest, stored, path)
    model = _build_for_load(manifest, path)
    _load_state(model, state, path, manifest)
    for full in field(manifest, "masked", list, path):
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
    return read_verified(Path(path))[0]


# ----------------------------------------------------------------------------------------------
# Architecture: the factory, and rebuilding what it builds


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
    return factory_path, jsonable(kwargs, "factory kwargs")


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


def _instantiate(build: Callable[..., nn.Module], kwargs: dict[str, Any], factory_path: str,
                 error: type[TorchslimError], *, try_meta: bool = True) -> tuple[nn.Module, bool]:
    """Call the factory, on the meta device when it works; never disturbs the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        if try_meta:
            try:
                with on_device(True):
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


def _check_rebuild(fresh: nn.Module, on_meta: bool, specs: dict[str, Any], state: dict[str, torch.Tensor],
                   factory_path: str) -> None:
    """Rebuild at save time what load will rebuild, so a checkpoint that saves also loads."""
    rebuilt = apply_specs(fresh, specs, TorchslimError, "save", on_meta)
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
    arch = field(manifest, "arch", dict, path)
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
    return apply_specs(model, field(manifest, "modules", dict, path), CheckpointError, str(path), False)


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


def _sparsity(state: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for key, value in state.items():
        if (key == "weight" or key.endswith(".weight")) and value.is_floating_point() and value.dim() >= 2:
            zeros = value.numel() - int(torch.count_nonzero(value))
            out[key[: -len(".weight")] if "." in key else ""] = round(zeros / max(1, value.numel()), 6)
    return out
