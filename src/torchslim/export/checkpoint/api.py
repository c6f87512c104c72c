"""Saving and loading ``.slim`` checkpoints, and reading their manifest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..._version import __version__
from ...core.errors import CheckpointError, TorchslimError
from ...core.files import atomic_write
from ...core.history import history as model_history
from ...data.batches import as_example_inputs, call_model
from ...nn.inference import for_inference as inference_form
from ...nn.masks import attach_mask, effective_state
from .codecs import diff_modules
from .encodings import ENCODINGS, check_entries, decode_all, encode_tensor, stored_name
from .format import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointExistsError,
    check_target,
    field,
    jsonable,
    pack,
    read_verified,
    stored_parts,
)
from .rebuild import build_for_load, check_rebuild, instantiate, load_state, resolve_arch
from .trust import Trusted, normalise, resolve_factory

# Without max_bytes, load allows tensors of up to this many bytes per byte of file (pruned tensors stored as
# gaps or entropy codes expand about 100x), and at least DEFAULT_MIN_BYTES.
EXPANSION = 1024
DEFAULT_MIN_BYTES = 256 << 20


def save(model: nn.Module, path: str | os.PathLike, *, factory: str | Callable[..., nn.Module] | None = None,
         factory_kwargs: dict[str, Any] | None = None, history: list[dict] | None = None,
         metrics: dict[str, Any] | None = None, overwrite: bool = False,
         encodings: Sequence[str] | None = None, example_inputs: Any = None,
         sign_key: bytes | str | None = None, allow_nonfinite: bool = False) -> Path:
    """Write ``model`` to a single ``.slim`` file at ``path`` and return the path.

    The architecture is recorded as ``type(model)`` plus ``model.init_kwargs`` (torchslim's models
    have it) or, when given, ``factory`` ("pkg.module:callable" or the callable itself) plus
    ``factory_kwargs``. Modules whose type or shape differs from what the factory builds (structured
    pruning, low-rank factors) are recorded too. ``torch.nn.utils.prune`` masks are folded into the
    weights and re-applied by :func:`load`; ``model`` itself is not modified. The file is written
    atomically and an existing file is only replaced with ``overwrite=True``. ``encodings`` limits the
    registered tensor encodings save may choose from (``"dense"`` is always allowed); by default each
    tensor gets the smallest of all. With ``example_inputs`` (a tensor or a tuple), the file is loaded back
    before it is written and must give exactly the model's outputs (in eval mode). ``sign_key`` adds an
    HMAC-SHA256 signature that ``load(..., verify_key=...)`` checks. A NaN/inf tensor is refused unless
    ``allow_nonfinite``.
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

    factory_path, kwargs = resolve_arch(model, factory, factory_kwargs)
    # The caller names the factory, so it is trusted here (and when save loads the file back to check it).
    build = resolve_factory(factory_path, (factory_path,), "save", TorchslimError)
    folded, masked = effective_state(model)
    # Private copies: encoders may slice them freely and safetensors refuses shared storage. A folded
    # ``orig * mask`` is already one, so only the model's own tensors are copied (pruned weights held once).
    fresh_products = set(masked)
    state = {k: (v.detach() if k in fresh_products and v.device.type == "cpu" else v.detach().to("cpu", copy=True)
                 ).contiguous() for k, v in folded.items()}
    del folded
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None and not allow_nonfinite:
        raise CheckpointError(f"save: tensor {bad!r} has NaN/inf values (a diverged run?); fix or retrain the "
                              "model, or pass allow_nonfinite=True to save it anyway")

    fresh, on_meta = instantiate(build, kwargs, factory_path, TorchslimError)
    if type(fresh) is not type(model):
        raise TorchslimError(f"factory {factory_path!r} builds a {type(fresh).__qualname__}, but the model is a "
                             f"{type(model).__qualname__}; pass the factory that builds this model")
    specs = diff_modules(model, fresh)
    check_rebuild(fresh, on_meta, specs, state, factory_path)

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
    blob = pack(manifest, stored, sign_key)
    if example_inputs is not None:
        _check_outputs(model, blob, path, factory_path, example_inputs)
    atomic_write(path, blob, overwrite=overwrite, exists_error=CheckpointExistsError)
    return path


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu", trusted: Trusted | str | None = None,
         verify_key: bytes | str | None = None, max_bytes: int | None = None, for_inference: bool = False,
         keep_packed: bool = False) -> nn.Module:
    """Rebuild the model saved at ``path`` (verifying its sha256) and move it to ``map_location``.

    Only trusted code is called to rebuild it: torchslim's and torch.nn's modules, registered module codecs
    and factories, and what ``trusted`` names ("pkg.module" or "pkg.module:callable"; see
    :func:`register_factory`). With ``verify_key`` the file must carry a valid HMAC-SHA256 signature made
    with that key. ``max_bytes`` bounds the memory the model's tensors may take (by default 1024 times the
    file's size, at least 256 MiB). Pruning masks recorded at save time are re-applied (as bool
    masks in ``prune.custom_from_mask``'s form) so the zeros stay zero during further training (the default: the
    model loads as it was saved, ready to train on). With ``for_inference=True`` the model comes back in eval mode in its
    fastest form instead (:func:`torchslim.nn.inference.for_inference`): masks folded away, shared and
    integer-coded weights decoded to plain float layers (``keep_packed=True`` keeps low-bit integer layers
    packed), exactly the same outputs, as fast as the uncompressed model. Raises CheckpointError for
    missing, truncated, corrupted, tampered or untrusted files and for architectures this process cannot
    rebuild.
    """
    path = Path(path)
    manifest, data = read_verified(path, verify_key)
    limit = max_bytes if max_bytes is not None else max(DEFAULT_MIN_BYTES, EXPANSION * len(data))
    model = _rebuild(manifest, data, path, normalise(trusted), limit, masks=not for_inference)
    if for_inference:
        model = inference_form(model, keep_packed=keep_packed, inplace=True)
    return model.to(map_location)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Return the verified manifest of the checkpoint at ``path`` without building the model."""
    return read_verified(Path(path))[0]


def _rebuild(manifest: dict[str, Any], data: bytes, path: Path, trusted: tuple[str, ...],
             max_bytes: int, masks: bool = True) -> nn.Module:
    stored = stored_parts(manifest, data, path)
    shapes = check_entries(manifest, stored, path, max_bytes)
    model = build_for_load(manifest, shapes, path, trusted, max_bytes)
    state = decode_all(manifest, stored, path)
    load_state(model, state, path, manifest["arch"]["factory"])
    del state, stored  # copied into the model: free them before the masks below take their own memory
    for full in field(manifest, "masked", list, path):
        if not isinstance(full, str):
            raise CheckpointError(f"{path}: malformed 'masked' entry {full!r}; the file is corrupted")
        if not masks:  # for inference: the stored zeros are the pruned weights, no mask needed
            continue
        module_path, _, tensor_name = full.rpartition(".")
        try:
            module = model.get_submodule(module_path)
            attach_mask(module, getattr(module, tensor_name) != 0, tensor_name)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot re-apply the pruning mask of {full!r} ({exc})") from None
    model.train(bool(manifest.get("training", True)))
    return model


def _check_outputs(model: nn.Module, blob: bytes, path: Path, factory_path: str, example_inputs: Any) -> None:
    """Load ``blob`` back and compare its outputs with ``model``'s on ``example_inputs`` (eval mode, exact)."""
    manifest, data = read_verified(path, None, data=blob)
    rebuilt = _rebuild(manifest, data, path, (factory_path,), max(DEFAULT_MIN_BYTES, EXPANSION * len(data)))
    device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    inputs = as_example_inputs(example_inputs)  # a tensor, a tuple of positional inputs or a dict of keywords
    was_training = model.training
    try:
        model.eval()
        rebuilt.to(device).eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            expected, got = call_model(model, inputs), call_model(rebuilt, inputs)
    finally:
        model.train(was_training)
    flat_a, flat_b = _flatten(expected), _flatten(got)
    if len(flat_a) != len(flat_b) or not all(_same_output(a, b) for a, b in zip(flat_a, flat_b)):
        raise TorchslimError(
            f"save: the model rebuilt from the checkpoint for {path} gives different outputs on example_inputs than "
            "the model itself; a module's constructor arguments do not describe it fully (register a codec for it "
            "with torchslim.export.checkpoint.register_module) or its forward depends on state not in state_dict")


def _flatten(out: Any, depth: int = 0) -> list[Any]:
    if isinstance(out, (list, tuple)):
        return [x for o in out for x in _flatten(o, depth)]
    if isinstance(out, dict):
        return [x for k in sorted(out) for x in _flatten(out[k], depth)]
    if hasattr(out, "__dict__") and not torch.is_tensor(out) and depth < 4:
        # Output objects such as a transformers key/value cache: compare the tensors they hold.
        return [type(out), *_flatten(vars(out), depth + 1)]
    return [out]


def _same_output(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b) or (
            a.is_floating_point() and ((a == b) | (a.isnan() & b.isnan())).all()))
    return type(a) is type(b) and a == b


def _sparsity(state: dict[str, torch.Tensor]) -> dict[str, float]:
    out = {}
    for key, value in state.items():
        if (key == "weight" or key.endswith(".weight")) and value.is_floating_point() and value.dim() >= 2:
            zeros = value.numel() - int(torch.count_nonzero(value))
            out[key[: -len(".weight")] if "." in key else ""] = round(zeros / max(1, value.numel()), 6)
    return out
