"""Recording a model's architecture at save time and rebuilding it at load time.

Loading builds the architecture on the meta device first (no memory), compares every tensor shape with the
manifest, and only then builds it for real, so factory or module arguments in a file cannot allocate more
than the tensors the file stores.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...core.errors import CheckpointError, TorchslimError
from .codecs import apply_specs, on_device
from .format import field, jsonable
from .trust import qualified_name, resolve_factory


def resolve_arch(model: nn.Module, factory: str | Callable[..., nn.Module] | None,
                 factory_kwargs: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
    """The factory name and keyword arguments ``save`` records for ``model``."""
    cls = type(model)
    if factory is not None:
        if isinstance(factory, str):
            factory_path = factory
        elif callable(factory):
            factory_path = qualified_name(factory)
        else:
            raise TorchslimError(f"factory must be 'pkg.module:callable' or a callable, got {factory!r}")
        kwargs = factory_kwargs or {}
    elif isinstance(getattr(model, "init_kwargs", None), dict) and factory_kwargs is None:
        factory_path, kwargs = qualified_name(cls), model.init_kwargs
    else:
        required = _required_params(cls)
        if required and factory_kwargs is None:
            raise TorchslimError(
                f"cannot record how to rebuild {cls.__qualname__}: its constructor needs {required} and the model "
                f"has no init_kwargs dict. Pass factory='pkg.module:callable' (e.g. "
                f"'{cls.__module__}:{cls.__qualname__}') with factory_kwargs={{...}}, or set model.init_kwargs")
        factory_path, kwargs = qualified_name(cls), factory_kwargs or {}
    if not isinstance(kwargs, dict):
        raise TorchslimError(f"factory kwargs must be a dict, got {type(kwargs).__name__}")
    return factory_path, jsonable(kwargs, "factory kwargs")


def _required_params(cls: type) -> list[str]:
    try:
        sig = inspect.signature(cls)
    except (TypeError, ValueError):
        return []
    return [p.name for p in sig.parameters.values()
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def instantiate(build: Callable[..., nn.Module], kwargs: dict[str, Any], factory_path: str,
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


def compare_shapes(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between ``model``'s tensors and ``shapes`` (names and shapes), for an error message."""
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(have) - set(shapes))
    unexpected = sorted(set(shapes) - set(have))
    mismatched = {k: (s, have[k]) for k, s in shapes.items() if k in have and s != have[k]}
    problems = []
    if mismatched:
        problems.append("shape mismatch (stored vs rebuilt) " + ", ".join(
            f"{k}: {a} vs {b}" for k, (a, b) in list(mismatched.items())[:5]))
    if missing:
        problems.append(f"tensors the rebuilt model has but the stored ones lack: {missing[:5]}")
    if unexpected:
        problems.append(f"tensors the rebuilt model lacks: {unexpected[:5]}")
    return problems


def check_rebuild(fresh: nn.Module, on_meta: bool, specs: dict[str, Any], state: dict[str, torch.Tensor],
                  factory_path: str) -> None:
    """Rebuild at save time what load will rebuild, so a checkpoint that saves also loads."""
    rebuilt = apply_specs(fresh, specs, TorchslimError, "save", on_meta)
    problems = compare_shapes(rebuilt, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise TorchslimError(
            f"cannot record the architecture: rebuilding it from {factory_path} and the recorded module changes gives "
            f"different tensors ({'; '.join(problems)}). A module changed shape without updating its constructor "
            "attributes (e.g. out_channels, in_features, num_features), or a custom module changed: register it with "
            "torchslim.export.checkpoint.register_module")


def build_for_load(manifest: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path,
                   trusted: tuple[str, ...], max_bytes: int) -> nn.Module:
    """The model the manifest describes, built from trusted code only, with shapes checked before any
    memory is allocated for it."""
    arch = field(manifest, "arch", dict, path)
    factory_path, kwargs = arch.get("factory"), arch.get("kwargs", {})
    if not isinstance(factory_path, str) or not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: malformed 'arch' in the manifest; the file is corrupted")
    specs = field(manifest, "modules", dict, path)
    build = resolve_factory(factory_path, trusted, str(path))
    model, on_meta = instantiate(build, kwargs, factory_path, CheckpointError)
    # Recorded modules on the meta device first: their arguments come from the file too.
    probe = apply_specs(model, specs, CheckpointError, str(path), True)
    problems = compare_shapes(probe, shapes)
    if problems:
        raise CheckpointError(f"{path}: the architecture recorded in the manifest ({factory_path}) does not fit "
                              f"the stored tensors ({'; '.join(problems)}); the file is corrupted or was edited")
    size = sum(t.numel() * t.element_size() for t in [*probe.parameters(), *probe.buffers()])
    if size > max_bytes:
        raise CheckpointError(f"{path}: the recorded architecture needs {size} bytes, more than the limit of "
                              f"{max_bytes}; if you expect a model this large, pass load(path, max_bytes=...)")
    if on_meta:
        model, _ = instantiate(build, kwargs, factory_path, CheckpointError, try_meta=False)
    return apply_specs(model, specs, CheckpointError, str(path), False)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: Path, factory: str) -> None:
    """Load ``state`` into ``model`` (adopting the stored dtypes) or raise CheckpointError."""
    # Modules are built in the default dtype; adopt the stored dtype in place so tied parameters stay tied.
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if name in state and tensor.dtype != state[name].dtype:
            # Only float precision may differ (a model saved in half or double); integer codes and masks keep
            # the dtype their module computes with.
            if not (tensor.is_floating_point() and state[name].is_floating_point()):
                raise CheckpointError(f"{path}: tensor {name!r} is stored as {state[name].dtype}, but the rebuilt "
                                      f"model holds it as {tensor.dtype}; the file is corrupted or was edited")
            tensor.data = tensor.data.to(state[name].dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:600]
        raise CheckpointError(
            f"{path}: the stored tensors do not fit the model rebuilt by {factory} ({detail}); "
            "the factory's code probably changed since the checkpoint was written") from None
