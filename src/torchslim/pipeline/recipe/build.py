"""Building what a recipe names: its model, data and metric, and checking its per-layer entries against the
model before any work."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import importlib
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import safetensors.torch
import torch
from torch import nn

from ...core.checks import did_you_mean
from ...core.errors import ConfigError, DataError, TorchslimError
from ...core.technique import SearchSpace, Techniques
from ...data import Splits, load_dataset
from ...export.checkpoint import load
from ...metrics import evaluate
from ...models import build_model as build_builtin
from ...techniques import BUILTIN
from ...training.train import train as train_model
from .schema import Recipe
from .yaml_source import Key, Problems


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """Let a factory module sit next to the recipe, without leaving the folder on sys.path afterwards."""
    entry = str(folder.resolve())
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if added and entry in sys.path:
            sys.path.remove(entry)


def import_callable(spec: str, base_dir: str | Path = ".") -> Callable:
    """Import ``"pkg.module:function"`` (``base_dir`` is searched first); errors say what is missing."""
    module_name, _, qual = spec.partition(":")
    try:
        with _on_path(Path(base_dir)):
            obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import module {module_name!r} ({exc}); put {module_name.split('.')[0]}.py next "
                          "to the recipe or install the package that provides it") from None
    except Exception as exc:  # the user's module raised while importing
        raise ConfigError(f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for attr in qual.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"module {module_name!r} has no attribute {qual!r}")
        obj = getattr(obj, attr)
    if not callable(obj):
        raise ConfigError(f"{spec} is not callable")
    return obj


def trusted_code(recipe: Recipe) -> tuple[str, ...]:
    """What a checkpoint of this recipe may call (see ``torchslim.load``): the recipe's ``model.trusted`` and the
    modules of its factories (recipes are code: they name those modules themselves)."""
    names = list(recipe.model.trusted) if recipe.model is not None else []
    for spec in (recipe.model, recipe.data):
        if spec is not None and spec.factory is not None:
            names.append(spec.factory.partition(":")[0])
    return tuple(names)


def load_checkpoint(recipe: Recipe, path: str | Path, trusted: tuple[str, ...] = ()) -> nn.Module:
    """``torchslim.load(path)`` trusting :func:`trusted_code` of ``recipe`` (and ``trusted``); the recipe's
    factory modules may sit next to the recipe file."""
    with _on_path(Path(recipe.base_dir)):
        return load(path, trusted=(*trusted_code(recipe), *trusted))


def build_data(recipe: Recipe) -> Splits:
    """The recipe's :class:`~torchslim.data.Splits` (train / val / test)."""
    spec = recipe.data
    if spec is None:
        raise ConfigError(f"{recipe.source} names no data: add a data: section (builtin or factory), or pass "
                          "data= (a torchslim.data.Splits) from Python")
    if spec.builtin is not None:
        return load_dataset(spec.builtin, **spec.kwargs)
    fn = import_callable(spec.factory, recipe.base_dir)
    try:
        out = fn(**spec.kwargs)
    except TorchslimError:
        raise
    except Exception as exc:
        raise DataError(f"data factory {spec.factory}(**{spec.kwargs!r}) failed: {type(exc).__name__}: {exc}") from None
    if isinstance(out, Splits):
        return out
    if isinstance(out, Mapping) and all(k in out for k in ("train", "val", "test")):
        return Splits(name=spec.factory, train=out["train"], val=out["val"], test=out["test"],
                      num_classes=int(out.get("num_classes", 0)))
    raise DataError(f"data factory {spec.factory} returned {type(out).__name__}; return a torchslim.data.Splits or "
                    "a mapping with 'train', 'val' (held out from train) and 'test' loaders")


def build_model(recipe: Recipe, data=None, log: Callable[[str], None] = print, *, check: bool = False,
                train: bool = True, techniques: Techniques = BUILTIN,
                state_path: str | Path | None = None) -> nn.Module:
    """The recipe's model with its weights (trained on ``data.train`` first when the recipe says ``train``,
    unless ``train`` is False).

    ``check`` runs :func:`check_against_model` (with ``techniques``) before any training (it needs ``data`` for
    example inputs). ``state_path``: checkpoint the training there each epoch and resume from it (see
    :func:`torchslim.pipeline.baseline.baseline_model`, which keys it by the recipe)."""
    spec = recipe.model
    if spec is None:
        raise ConfigError(f"{recipe.source} names no model: add a model: section (builtin, factory or "
                          "checkpoint), or pass model= (a trained nn.Module) from Python")
    # Initial weights and training are reproducible from the recipe's seed.
    if data is not None:
        reseed(data, recipe.seed)
    else:
        torch.manual_seed(recipe.seed)
    if spec.checkpoint is not None:
        model = load_checkpoint(recipe, recipe.resolve_path(spec.checkpoint))
    elif spec.builtin is not None:
        model = build_builtin(spec.builtin, **spec.kwargs)
    else:
        fn = import_callable(spec.factory, recipe.base_dir)
        try:
            model = fn(**spec.kwargs)
        except Exception as exc:
            raise ConfigError(f"model factory {spec.factory}(**{spec.kwargs!r}) failed: "
                              f"{type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model factory {spec.factory} returned {type(model).__name__}, not an nn.Module")
    if spec.weights is not None:
        _load_weights(model, recipe.resolve_path(spec.weights))
    if check and data is not None:
        check_against_model(recipe, model, data.example_inputs(recipe.example_batch), techniques)
    if spec.train is not None and train:
        if data is None:
            raise ConfigError("model.train needs the recipe's data; pass data=")
        log(f"training the {spec.builtin or spec.factory or 'model'} model ({spec.train.epochs:g} epochs)")
        train_model(model, data.train, spec.train, val_loader=data.val, state_path=state_path)
    return model.cpu().eval()


def _load_weights(model: nn.Module, path: Path) -> None:
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"cannot read weights {path}: {type(exc).__name__}: {exc}") from None
    if isinstance(state, dict) and not any(hasattr(v, "shape") for v in state.values()):
        state = state.get("state_dict", state.get("model", state))
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise ConfigError(f"weights {path} do not fit the model: {exc}") from None


def metric_function(recipe: Recipe) -> Callable[[nn.Module, Any], float]:
    """``metric(model, loader) -> float`` (higher is better): top-1 accuracy or the recipe's function."""
    if recipe.metric == "accuracy":
        return evaluate
    fn = import_callable(recipe.metric, recipe.base_dir)

    def metric(model: nn.Module, loader) -> float:
        return float(fn(model, loader))

    return metric


def reseed(data, seed: int) -> None:
    """Seed torch and the training loader's shuffling, so that a run depends on the seed only (not on what
    used the data before in this process)."""
    torch.manual_seed(seed)
    loader = data.train
    gens = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    for i, g in enumerate(gens):
        if isinstance(g, torch.Generator) and g not in gens[:i]:
            g.manual_seed(seed)


def save_kwargs(recipe: Recipe, model: nn.Module) -> dict[str, Any]:
    """Arguments that let ``torchslim.save`` record how to rebuild a factory model without ``init_kwargs``."""
    if recipe.model is not None and recipe.model.factory is not None and \
            not isinstance(getattr(model, "init_kwargs", None), dict):
        return {"factory": recipe.model.factory, "factory_kwargs": dict(recipe.model.kwargs)}
    return {}


def _search_space(techniques: Techniques, config) -> SearchSpace | None:
    # A stage built in Python may use a config that no technique in ``techniques`` describes: nothing to check.
    return techniques.of(config).search if type(config) in techniques else None


def _check_patterns(config, modules: list[str], path: tuple, problems: Problems) -> None:
    """Layer-name patterns (``exclude``, and ``layers`` where empty means every layer) that match no module."""
    for f in dataclasses.fields(config):
        if not (f.name == "exclude" or (f.name == "layers" and f.default == ())):
            continue  # DynamicQuantization.layers, say, names layer types, not layers
        for k, pattern in enumerate(getattr(config, f.name) or ()):
            if isinstance(pattern, str) and not fnmatch.filter(modules, pattern):
                problems.add(path + (f.name, k), f"pattern {pattern!r} matches no layer of the model"
                             f"{did_you_mean(pattern, modules)}; layers: {modules}")


def check_against_model(recipe: Recipe, model: nn.Module, example_inputs: tuple,
                        techniques: Techniques = BUILTIN) -> None:
    """Check that per-layer entries (``sparsity: {fc1: 0.9}``...) and layer patterns (``exclude``) name layers
    the model has, before any work.
    Each stage's searchable fields (its technique's ``search`` in ``techniques``) say which entries are layers."""
    problems = Problems(recipe.source, recipe.lines)
    modules = [n for n, _ in model.named_modules() if n]
    for i, stage in enumerate(recipe.stages):
        if any(earlier is not None and earlier.renames_layers
               for earlier in (_search_space(techniques, s.config) for s in recipe.stages[:i])):
            break  # layer names after a decomposition are those of the decomposed model
        _check_patterns(stage.config, modules, ("stages", i), problems)
        space = _search_space(techniques, stage.config)
        if space is None:
            continue
        for fs in space.fields:
            value = getattr(stage.config, fs.field)
            if not isinstance(value, dict):
                continue
            valid = fs.valid_keys(stage.config, model, example_inputs)
            for key in value:
                if key not in valid and not fnmatch.filter(valid, key):
                    problems.add(("stages", i, fs.field, Key(key)), f"no layer {key!r} in the model for {fs.field}"
                                 f"{did_you_mean(key, valid)}; layers: {valid}")
    problems.raise_if_any()
