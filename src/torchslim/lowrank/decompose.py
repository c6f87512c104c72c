"""``decompose``: replace Linear / Conv2d layers by low-rank sequences, choosing ranks per layer."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.errors import ConfigError, UnsupportedModelError
from ..core.history import record
from ..data import Splits, check_loader
from ..data.batches import as_example_inputs, select, split_batch
from ..metrics.evaluate import Metric
from ..nn.modules import check_patterns, copy_model, match
from ..training.losses import LossFn
from .config import CP, SVD, Tucker, selected
from .cp import cp_conv, cp_max_rank, cp_params
from .svd import energy_rank, linear_svd, svd_linear, svd_max_rank, svd_params
from .scan import Scanner, record_shapes, set_module
from .tucker import (
    tucker_conv,
    tucker_energy_ranks,
    tucker_max_ranks,
    tucker_params,
    tucker_rank_grid,
)

Rank = Any  # int (SVD, CP) or (in_rank, out_rank) (Tucker)


class _Method:
    """What differs between SVD, Tucker-2 and CP: the layer type, costs, rank grids and the factorisation."""

    name = ""
    layer_type: type = nn.Module
    rank_field = "rank"

    def __init__(self, config):
        self.config = config

    def unsupported(self, layer: nn.Module) -> str | None:
        if type(layer) is not self.layer_type:
            return (f"{type(layer).__name__} is a subclass of {self.layer_type.__name__} (e.g. quantization-aware "
                    "or a custom layer) whose behaviour the plain decomposed layers would lose; decompose "
                    "before preparing/converting it")
        return None

    def params(self, layer: nn.Module, rank: Rank) -> int:
        raise NotImplementedError

    def macs(self, layer: nn.Module, rank: Rank, shapes: tuple) -> int:
        raise NotImplementedError

    def original_macs(self, layer: nn.Module, shapes: tuple) -> int:
        raise NotImplementedError

    def max_rank(self, layer: nn.Module) -> Rank:
        raise NotImplementedError

    def grid(self, layer: nn.Module) -> list[Rank]:
        raise NotImplementedError

    def energy_rank(self, layer: nn.Module, energy: float) -> Rank:
        raise NotImplementedError

    def build(self, layer: nn.Module, rank: Rank) -> tuple[nn.Module, float]:
        raise NotImplementedError

    def explicit_rank(self, value: Any) -> Rank:
        return int(value)

    def too_large(self, layer: nn.Module, rank: Rank) -> bool:
        return rank > self.max_rank(layer)

    def report_rank(self, rank: Rank) -> Any:
        return rank


class _SVDMethod(_Method):
    name = "svd"
    layer_type = nn.Linear

    def __init__(self, config):
        super().__init__(config)
        self._usv: dict[int, tuple] = {}

    def _factors(self, layer):
        if id(layer) not in self._usv:
            self._usv[id(layer)] = linear_svd(layer)
        return self._usv[id(layer)]

    def params(self, layer, rank):
        return svd_params(layer, rank)

    def original_macs(self, layer, shapes):
        tokens = _numel(shapes[0]) // layer.in_features
        return tokens * layer.in_features * layer.out_features

    def macs(self, layer, rank, shapes):
        tokens = _numel(shapes[0]) // layer.in_features
        return tokens * rank * (layer.in_features + layer.out_features)

    def max_rank(self, layer):
        return svd_max_rank(layer)

    def grid(self, layer):
        return list(range(1, svd_max_rank(layer) + 1))

    def energy_rank(self, layer, energy):
        return energy_rank(self._factors(layer)[1], energy)

    def build(self, layer, rank):
        return svd_linear(layer, rank, self._factors(layer))


def _conv_macs_out(shapes: tuple) -> int:
    out = shapes[1]
    return out[-2] * out[-1]


class _ConvMethod(_Method):
    """Shared by the Conv2d decompositions, which need a dense (ungrouped) kernel."""

    layer_type = nn.Conv2d
    label = ""

    def unsupported(self, layer):
        if layer.groups != 1:
            return (f"grouped convolution (groups={layer.groups}): {self.label} needs a dense Cout x Cin kernel; "
                    "left as is")
        return super().unsupported(layer)

    def original_macs(self, layer, shapes):
        kh, kw = layer.kernel_size
        return layer.out_channels * layer.in_channels * kh * kw * _conv_macs_out(shapes)


class _TuckerMethod(_ConvMethod):
    name = "tucker"
    label = "Tucker-2"
    rank_field = "ranks"

    def params(self, layer, rank):
        return tucker_params(layer, rank)

    def macs(self, layer, rank, shapes):
        r_in, r_out = rank
        kh, kw = layer.kernel_size
        hw_in = shapes[0][-2] * shapes[0][-1]
        hw_out = _conv_macs_out(shapes)
        return layer.in_channels * r_in * hw_in + r_in * r_out * kh * kw * hw_out + r_out * layer.out_channels * hw_out

    def max_rank(self, layer):
        return tucker_max_ranks(layer)

    def grid(self, layer):
        return tucker_rank_grid(layer)

    def energy_rank(self, layer, energy):
        return tucker_energy_ranks(layer, energy)

    def build(self, layer, rank):
        return tucker_conv(layer, rank, self.config.n_iter_max)

    def explicit_rank(self, value):
        return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value), int(value))

    def too_large(self, layer, rank):
        max_in, max_out = self.max_rank(layer)
        return rank[0] > max_in or rank[1] > max_out

    def report_rank(self, rank):
        return list(rank)


class _CPMethod(_ConvMethod):
    name = "cp"
    label = "CP"

    def params(self, layer, rank):
        return cp_params(layer, rank)

    def macs(self, layer, rank, shapes):
        kh, kw = layer.kernel_size
        h_in, w_in = shapes[0][-2:]
        h_out, w_out = shapes[1][-2:]
        return rank * (layer.in_channels * h_in * w_in + kh * h_out * w_in + kw * h_out * w_out
                       + layer.out_channels * h_out * w_out)

    def max_rank(self, layer):
        return cp_max_rank(layer)

    def grid(self, layer):
        return list(range(1, cp_max_rank(layer) + 1))

    def build(self, layer, rank):
        c = self.config
        return cp_conv(layer, rank, c.n_iter_max, c.tol, c.seed)


_METHODS = {SVD: _SVDMethod, Tucker: _TuckerMethod, CP: _CPMethod}


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _check_selection(config, method: _Method, candidates: list[tuple[str, nn.Module]]) -> None:
    """Refuse patterns that select nothing and layers whose weights no factorisation can take."""
    kind, names = method.layer_type.__name__, [n for n, _ in candidates]
    check_patterns(f"{type(config).__name__}.layers", config.layers, names, kind)
    check_patterns(f"{type(config).__name__}.exclude", config.exclude, names, kind)
    for name, layer in candidates:
        if selected(config, name) and not torch.isfinite(layer.weight.detach()).all():
            raise UnsupportedModelError(f"{kind} layer {name!r} has NaN/inf weights, which "
                                        f"{type(config).__name__} cannot factorise; fix or retrain the model, or "
                                        f"leave the layer out with exclude=({name!r},)")


def decompose(model: nn.Module, config: SVD | Tucker | CP, *, data=None, val_data=None, example_inputs=None,
              loss_fn: LossFn | str | None = None, metric: Metric | None = None, inplace: bool = False) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with its Linear / Conv2d layers replaced by low-rank
    ``nn.Sequential`` of plain ``nn.Linear`` / ``nn.Conv2d``, with ``config`` and a per-layer report recorded in
    its history (``torchslim.core.history.history(model)[-1]["report"]``).

    The report maps every candidate layer name to ``{"method", "rank", "params_before", "params_after",
    "macs_before", "macs_after", "error", "skipped"}``: ``error`` is the relative (Frobenius) reconstruction error
    of the kernel, ``skipped`` None or the reason the layer was left alone; MACs (per sample) are None without
    ``example_inputs`` (a tensor, tuple or dict) or ``val_data`` (whose first sample is then used).
    ``max_drop`` scans each layer's ``metric`` (default top-1 accuracy) on ``val_data``. Nothing is trained:
    ``loss_fn`` is accepted for the shared verb signature. ``data`` used to mean the scan data: a
    :class:`~torchslim.data.Splits` there (its ``val`` split) or a loader without ``val_data`` still works and warns.
    """
    method_cls = _METHODS.get(type(config))
    if method_cls is None:
        raise ConfigError(f"decompose expects an SVD, Tucker or CP config, got {type(config).__name__}")
    method = method_cls(config)
    if isinstance(data, Splits) or (data is not None and val_data is None):
        warnings.warn("decompose(data=...) for its scans is deprecated: pass val_data= (a loader, e.g. "
                      "splits.val)", DeprecationWarning, stacklevel=2)
        val_data = data.val if isinstance(data, Splits) else data
    loader = val_data
    if loader is not None:
        check_loader(loader, "decomposition data (val_data)")
    if config.selection == "sensitivity" and loader is None:
        raise ConfigError(f"{type(config).__name__}(max_drop=...) scans each layer's metric: pass val_data= "
                          "(a loader of labelled batches)")
    if example_inputs is not None:
        example_inputs = as_example_inputs(example_inputs)
    elif loader is not None:
        inputs = split_batch(next(iter(loader)))[0]
        example_inputs = as_example_inputs(select(inputs, slice(0, 1)))

    new = model if inplace else copy_model(model)
    candidates = [(n, m) for n, m in new.named_modules() if n and isinstance(m, method.layer_type)]
    names = [n for n, _ in candidates]
    _check_selection(config, method, candidates)
    rank_value = getattr(config, method.rank_field)
    if isinstance(rank_value, dict):  # a typo in a layer name must not pass silently
        unknown = sorted(set(rank_value) - set(names))
        if unknown:
            raise ConfigError(f"{method.rank_field} names layer(s) {unknown} that are not "
                              f"{method.layer_type.__name__} layers of the model; candidates: {names}")
    shapes = record_shapes(new, names, example_inputs) if example_inputs is not None and names else {}
    scanner = Scanner(model, loader, config.scan_batches, metric) if config.selection == "sensitivity" else None

    report: dict[str, dict[str, Any]] = {}
    bar = tqdm(candidates, desc=f"decompose ({method.name})", disable=not config.progress or len(candidates) < 2,
               leave=False, dynamic_ncols=True)
    for name, layer in bar:
        report[name], module = _decompose_layer(name, layer, method, shapes.get(name), scanner)
        if module is not None:
            set_module(new, name, module)
    bar.close()
    return record(new, config, report)


def _decompose_layer(name: str, layer: nn.Module, method: _Method, shapes: tuple | None,
                     scanner: Scanner | None) -> tuple[dict[str, Any], nn.Module | None]:
    """The report entry of one layer and its replacement (None when the layer is left alone)."""
    config = method.config
    params_before = sum(p.numel() for p in layer.parameters())
    macs_before = method.original_macs(layer, shapes) if shapes else None
    entry: dict[str, Any] = {"method": method.name, "rank": None, "params_before": params_before,
                             "params_after": params_before, "macs_before": macs_before, "macs_after": macs_before,
                             "error": None, "skipped": None}

    def skip(reason: str) -> tuple[dict[str, Any], None]:
        entry["skipped"] = reason
        return entry, None

    if config.layers and match(name, config.layers) is None:
        return skip("not selected by config.layers")
    if match(name, config.exclude) is not None:
        return skip("excluded by config.exclude")
    reason = method.unsupported(layer)
    if reason:
        return skip(reason)

    def cost(rank: Rank) -> tuple[int, int | None]:
        return method.params(layer, rank), method.macs(layer, rank, shapes) if shapes else None

    def saves(rank: Rank) -> bool:
        p, m = cost(rank)
        return p < params_before and (m is None or m < macs_before)

    built: tuple[nn.Module, float] | None = None
    rank_value = getattr(config, method.rank_field)
    if config.selection == "rank":
        value = rank_value.get(name) if isinstance(rank_value, dict) else rank_value
        if value is None:
            return skip(f"no {method.rank_field} given for this layer")
        rank = method.explicit_rank(value)
        if method.too_large(layer, rank):
            msg = (f"{method.rank_field} {method.report_rank(rank)} exceeds the maximum "
                   f"{method.report_rank(method.max_rank(layer))} for this layer")
            if isinstance(rank_value, dict):  # asked for this layer by name: an error, not a skip
                raise ConfigError(f"layer {name!r}: {msg}; give a smaller {method.rank_field}")
            return skip(msg)
    elif config.selection == "energy":
        rank = method.energy_rank(layer, config.energy)
    elif config.selection == "ratio":
        grid = method.grid(layer)
        fitting = [r for r in grid if method.params(layer, r) <= config.ratio * params_before]
        if not fitting:
            return skip(f"ratio {config.ratio} unreachable: the smallest rank needs "
                        f"{method.params(layer, grid[0])} of {params_before} params")
        rank = fitting[-1]
    else:
        saving = [r for r in method.grid(layer) if saves(r)]
        if not saving:
            return skip("no rank saves parameters and MACs")
        rank, built, drop = _scan(scanner, method, name, layer, saving, config.max_drop)
        if rank is None:
            return skip(f"sensitive: even rank {method.report_rank(saving[-1])} drops accuracy by {drop:.4f} "
                        f"> max_drop {config.max_drop}")
        entry["accuracy_drop"] = drop

    params_after, macs_after = cost(rank)
    entry["rank"] = method.report_rank(rank)
    if config.require_saving and not saves(rank):
        what = f"{params_after} params vs {params_before}"
        if macs_before is not None:
            what += f", {macs_after} MACs vs {macs_before}"
        return skip(f"no saving at rank {method.report_rank(rank)}: {what}")
    module, error = built if built is not None else method.build(layer, rank)
    entry.update(params_after=params_after, macs_after=macs_after, error=error)
    return entry, module


def _scan(scanner: Scanner, method: _Method, name: str, layer: nn.Module, ranks: list, max_drop: float):
    """Binary search (the metric grows with rank) for the smallest rank whose drop is <= ``max_drop``."""
    tried: dict[int, tuple[float, tuple[nn.Module, float]]] = {}

    def drop_at(i: int) -> float:
        if i not in tried:
            built = method.build(layer, ranks[i])
            tried[i] = (scanner.drop_with(name, built[0]), built)
        return tried[i][0]

    hi = len(ranks) - 1
    if drop_at(hi) > max_drop:
        return None, None, drop_at(hi)
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if drop_at(mid) <= max_drop:
            hi = mid
        else:
            lo = mid + 1
    return ranks[lo], tried[lo][1], tried[lo][0]


def summarize(report: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Totals over a decomposition report: layers decomposed / skipped, parameters before and after."""
    done = [n for n, e in report.items() if e["skipped"] is None]
    return {
        "decomposed": done,
        "skipped": {n: e["skipped"] for n, e in report.items() if e["skipped"] is not None},
        "params_before": sum(e["params_before"] for e in report.values()),
        "params_after": sum(e["params_after"] for e in report.values()),
    }


__all__ = ["decompose", "summarize"]
