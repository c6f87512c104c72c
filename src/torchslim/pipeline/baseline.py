"""The trained baseline of a recipe, cached once for ``compress``, ``sensitivity`` and ``search``.

A recipe that trains its model (``model: {train: ...}``) gets one cache entry, keyed by the recipe's ``model`` and
``data`` sections, its seed, the torchslim version and the bytes of the files and factory modules those sections
name: a changed recipe, seed, weights file or factory never reuses a stale model. The entry holds the trained
model (``model.slim``, loaded back through the checkpoint trust rule: only the recipe's own factories are
trusted), the key material (``key.json``) and, while training runs, the per-epoch training state that a re-run
after a kill resumes from.

The cache folder is ``$TORCHSLIM_CACHE_DIR`` if set (``off`` disables the cache), else
``$XDG_CACHE_HOME/torchslim`` (``~/.cache/torchslim``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from torch import nn

from .._version import __version__
from ..core.errors import WriteError
from ..core.files import atomic_write, writable_folder
from ..core.technique import Techniques
from ..export.checkpoint import save
from ..techniques import BUILTIN
from ..training.distributed import launched
from .recipe import Recipe, build_model, check_against_model, load_checkpoint, save_kwargs

__all__ = ["baseline_model", "baseline_key", "cache_dir", "CACHE_ENV"]

CACHE_ENV = "TORCHSLIM_CACHE_DIR"
_OFF = ("off", "none", "0", "false")


def cache_dir() -> Path | None:
    """The baseline cache folder (see the module docstring), or None when ``$TORCHSLIM_CACHE_DIR`` is ``off``."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip():
        return None if value.strip().lower() in _OFF else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "torchslim"


def _file_hash(path: Path) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def baseline_key(recipe: Recipe) -> tuple[str, dict[str, Any]]:
    """(short hash, key material) of what determines the trained baseline of ``recipe``."""
    d = recipe.to_dict()
    files: dict[str, str | None] = {}
    for spec in (recipe.model, recipe.data):
        if spec is None:
            continue
        for name in ("weights", "checkpoint"):
            value = getattr(spec, name, None)
            if value:
                files[value] = _file_hash(recipe.resolve_path(value))
        if spec.factory:
            # A factory module next to the recipe is part of the baseline's definition too.
            module = spec.factory.partition(":")[0].replace(".", "/")
            for candidate in (f"{module}.py", f"{module}/__init__.py"):
                if recipe.resolve_path(candidate).is_file():
                    files[candidate] = _file_hash(recipe.resolve_path(candidate))
    material = {"model": d.get("model"), "data": d.get("data"), "seed": recipe.seed, "torchslim": __version__,
                "files": files}
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    return digest[:16], json.loads(json.dumps(material))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def baseline_model(recipe: Recipe, data, log: Callable[[str], None] = print, *, techniques: Techniques = BUILTIN,
                   example_inputs=None) -> tuple[nn.Module, Path | None]:
    """The recipe's model, trained as the recipe says: from the cache when an entry of this recipe and seed
    exists (logged as "reused cached baseline from PATH"), else built, trained (resuming a killed run's training
    from its last finished epoch) and cached. Returns ``(model, path it was reused from or None)``.

    Recipes whose model is not trained, runs under ``torchrun`` and ``TORCHSLIM_CACHE_DIR=off`` build the model
    as :func:`~torchslim.pipeline.recipe.build_model` does, without the cache."""
    root = cache_dir()
    if recipe.model is None or recipe.model.train is None or root is None or launched():
        return build_model(recipe, data, log, check=True, techniques=techniques), None
    key, material = baseline_key(recipe)
    folder = root / f"baseline-{key}"
    path, meta, state = folder / "model.slim", folder / "key.json", folder / "train-state.pt"
    if path.is_file() and _read_json(meta) == material:
        model = load_checkpoint(recipe, path).eval()
        example = example_inputs if example_inputs is not None else data.example_inputs(recipe.example_batch)
        check_against_model(recipe, model, example, techniques)
        log(f"reused cached baseline from {path}")
        return model, path
    try:
        writable_folder(folder)
    except WriteError as exc:  # a cache that cannot be written costs the reuse, not the run
        log(f"not caching the baseline: {exc}")
        return build_model(recipe, data, log, check=True, techniques=techniques), None
    if state.is_file():
        log(f"resuming the baseline training from {state}")
    model = build_model(recipe, data, log, check=True, techniques=techniques, state_path=state)
    try:
        save(model, path, overwrite=True, **save_kwargs(recipe, model))
        # key.json last: an entry without it (a run killed in between) is never reused.
        atomic_write(meta, (json.dumps(material, indent=2, sort_keys=True) + "\n").encode())
    except WriteError as exc:
        log(f"not caching the baseline: {exc}")
        return model, None
    with contextlib.suppress(OSError):
        os.unlink(state)
    log(f"cached the trained baseline in {path}")
    return model, None
