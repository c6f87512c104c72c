"""Search spaces (which fields of which stage configs a search may tune, per layer) and one-shot sensitivity.

:func:`search_spaces` is the table the searches, the guard rails and the recipe checks share: for each config
type, the fields that set a compression rate, the layers they apply to, how a knob value becomes a field value,
how to make a setting milder, and the same technique without fine-tuning (for one-shot scans). A new technique
plugs in by adding an entry here; every other part treats stages generically.

:func:`sensitivity` is the user-facing scan: per layer, the metric (and the output error) against unstructured
sparsity and against weight bit width, each layer alone, without fine-tuning.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.config import Config, config_types
from ..core.errors import ConfigError, UnsupportedModelError
from ..core.files import atomic_write, save_figure
from ..nn.modules import copy_model, match

__all__ = ["FieldSpace", "TypeSpace", "Knob", "search_spaces", "build_knobs", "stage_configs", "soften",
           "knob_sensitivity", "sensitivity", "SensitivityResult", "output_error"]

LayerList = Callable[[Config, nn.Module, tuple], list[tuple[str, Any]]]

SPARSITY_GRID = (0.3, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
RATIO_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
RANK_GRID = (0.75, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05)


def _identity_encode(value: float, param: Any) -> Any:
    return float(value)


@dataclasses.dataclass(frozen=True)
class FieldSpace:
    """One searchable field. Knob values run from ``mild`` (no compression) to the other end of [low, high];
    ``grid`` (mild -> aggressive) is what one-shot scans try. ``layers`` lists ``(layer, param)`` pairs, one knob
    each (None: one knob for the whole field); ``encode(value, param)`` turns a knob value into the field's
    entry for that layer (None: leave the layer alone). ``choices`` makes the knob discrete (e.g. bits)."""

    field: str
    low: float
    high: float
    mild: float
    grid: tuple[float, ...]
    layers: LayerList | None = None
    encode: Callable[[float, Any], Any] = _identity_encode
    valid: Callable[[Config, nn.Module, tuple], list[str]] | None = None
    reduces: frozenset = frozenset({"size"})
    choices: tuple | None = None
    scalar_ok: bool = True

    def valid_keys(self, config: Config, model: nn.Module, example_inputs: tuple) -> list[str]:
        """Names a per-layer mapping of this field may use."""
        if self.valid is not None:
            return self.valid(config, model, example_inputs)
        return [name for name, _ in (self.layers(config, model, example_inputs) if self.layers else [])]


@dataclasses.dataclass(frozen=True)
class TypeSpace:
    """The search space of one config type: its fields; ``apply(config, {field: value})`` (None: the stage does
    nothing); ``oneshot(config)`` (no fine-tuning); ``soften(config, factor)`` (None: nothing to soften);
    ``renames_layers`` when the technique replaces layers by differently named ones."""

    fields: tuple[FieldSpace, ...]
    apply: Callable[[Config, dict[str, Any]], Config | None]
    oneshot: Callable[[Config], Config]
    soften: Callable[[Config, float], Config | None]
    renames_layers: bool = False


@dataclasses.dataclass(frozen=True)
class Knob:
    """One value the search chooses: ``field`` of stage ``stage`` for ``layer`` (None: the whole field)."""

    stage: int
    stage_name: str
    field: str
    layer: str | None
    low: float
    high: float
    mild: float
    grid: tuple[float, ...]
    choices: tuple | None = None
    param: Any = None
    encode: Callable[[float, Any], Any] = dataclasses.field(default=_identity_encode, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.stage_name}.{self.field}" + (f"[{self.layer}]" if self.layer is not None else "")

    def aggressive(self) -> float:
        """The most compressing value."""
        if self.choices is not None:
            return self.choices[-1]
        return self.high if self.mild == self.low else self.low


# ----------------------------------------------------------------------------------------------
# Per-type entries


def _scale_rates(value: Any, factor: float, mild: float = 0.0) -> Any:
    if isinstance(value, dict):
        return {k: mild + (v - mild) * factor for k, v in value.items()}
    return mild + (value - mild) * factor


def _prunable(config: Config, model: nn.Module, example_inputs: tuple) -> list[tuple[str, Any]]:
    from ..pruning.unstructured import prunable_layers

    return [(name, None) for name in prunable_layers(model, tuple(config.exclude))]


def _groups(config: Config, model: nn.Module, example_inputs: tuple):
    from ..pruning.graph import build_groups

    return build_groups(model, example_inputs, tuple(config.exclude))


def _leaders(config: Config, model: nn.Module, example_inputs: tuple) -> list[tuple[str, Any]]:
    return [(g.leader, None) for g in _groups(config, model, example_inputs) if g.prunable]


def _all_leaders(config: Config, model: nn.Module, example_inputs: tuple) -> list[str]:
    return [g.leader for g in _groups(config, model, example_inputs)]


def _no_schedule(config: Config) -> Config:
    from ..pruning.config import Schedule

    changes: dict[str, Any] = {"schedule": Schedule()}
    if getattr(config, "bn_penalty", 0):
        changes["bn_penalty"] = 0.0
    return config.replace(**changes)


def _apply_unstructured(config: Config, values: dict[str, Any]) -> Config:
    v = values.get("sparsity", config.sparsity)
    return config.replace(sparsity=v) if v != {} else config


def _apply_structured(config: Config, values: dict[str, Any]) -> Config:
    v = values.get("ratio", config.ratio)
    if v == {}:
        return config
    return config.replace(ratio=v, scope="layer") if isinstance(v, dict) else config.replace(ratio=v)


def _soften_field(name: str) -> Callable[[Config, float], Config]:
    def soften_(config: Config, factor: float) -> Config:
        return config.replace(**{name: _scale_rates(getattr(config, name), factor)})

    return soften_


def _selected(config: Config, patterns_field: str, name: str) -> bool:
    layers = getattr(config, "layers", ())
    if layers and match(name, layers) is None:
        return False
    return match(name, getattr(config, "exclude", ())) is None


def _linears(config: Config, model: nn.Module, example_inputs: tuple) -> list[tuple[str, Any]]:
    return [(n, min(m.in_features, m.out_features)) for n, m in model.named_modules()
            if n and type(m) is nn.Linear and _selected(config, "layers", n)]


def _convs(config: Config, model: nn.Module, example_inputs: tuple) -> list[tuple[str, Any]]:
    return [(n, (m.in_channels, m.out_channels)) for n, m in model.named_modules()
            if n and type(m) is nn.Conv2d and m.groups == 1 and _selected(config, "layers", n)]


def _cp_convs(config: Config, model: nn.Module, example_inputs: tuple) -> list[tuple[str, Any]]:
    from ..lowrank.cp import cp_max_rank

    return [(n, cp_max_rank(m)) for n, m in model.named_modules()
            if n and type(m) is nn.Conv2d and m.groups == 1 and _selected(config, "layers", n)]


def _rank_of(fraction: float, max_rank: Any) -> Any:
    """Kept share of the maximal rank -> rank (None: leave the layer whole)."""
    if fraction >= 1.0:
        return None
    if isinstance(max_rank, tuple):
        return tuple(max(1, round(fraction * r)) for r in max_rank)
    return max(1, round(fraction * max_rank))


def _apply_lowrank(rank_field: str) -> Callable[[Config, dict[str, Any]], Config | None]:
    def apply(config: Config, values: dict[str, Any]) -> Config | None:
        ranks = values.get(rank_field)
        if ranks is None:
            return config
        if isinstance(ranks, dict) and not ranks:
            return None  # every layer stays whole: the stage has nothing to do
        names = {f.name for f in dataclasses.fields(config)}
        clear = {k: None for k in ("energy", "ratio", "max_drop") if k in names}
        return config.replace(**clear, **{rank_field: ranks})

    return apply


def _soften_lowrank(rank_field: str) -> Callable[[Config, float], Config | None]:
    def soften_(config: Config, factor: float) -> Config | None:
        def more(r: Any) -> Any:
            if isinstance(r, (tuple, list)):
                return tuple(math.ceil(x / factor) for x in r)
            return math.ceil(r / factor)

        selection = getattr(config, "selection", None)
        if selection == "rank":
            value = getattr(config, rank_field)
            value = {k: more(v) for k, v in value.items()} if isinstance(value, dict) else more(value)
            return config.replace(**{rank_field: value})
        if selection == "energy":
            return config.replace(energy=1 - (1 - config.energy) * factor)
        if selection == "ratio":
            return config.replace(ratio=1 - (1 - config.ratio) * factor)
        if selection == "sensitivity":
            return config.replace(max_drop=config.max_drop * factor)
        return None

    return soften_


def _lowrank_space(rank_field: str, layers: LayerList) -> TypeSpace:
    every = frozenset({"size", "macs", "latency"})
    return TypeSpace(
        fields=(FieldSpace(rank_field, low=0.02, high=1.0, mild=1.0, grid=RANK_GRID, layers=layers, encode=_rank_of,
                           reduces=every, scalar_ok=False),),
        apply=_apply_lowrank(rank_field), oneshot=lambda c: c, soften=_soften_lowrank(rank_field),
        renames_layers=True)


def _shareable(config: Config, model: nn.Module, example_inputs: tuple) -> list[tuple[str, Any]]:
    from ..quantization.sharing import shareable_layers

    return [(name, None) for name in shareable_layers(model, tuple(config.exclude))]


def _bits_or_none(value: float, param: Any) -> int | None:
    return None if value == 0 else int(value)


def _apply_sharing(config: Config, values: dict[str, Any]) -> Config | None:
    bits = values.get("bits", config.bits)
    if bits is None or (isinstance(bits, dict) and not bits):
        return None  # every layer keeps its float weights: the stage has nothing to do
    return config.replace(bits=bits)


def _soften_bits(limit: int) -> Callable[[Config, float], Config | None]:
    def soften_(config: Config, factor: float) -> Config | None:
        def more(b: int) -> int:
            return min(limit, math.ceil(b / factor))

        bits = config.bits
        new = {k: more(v) for k, v in bits.items()} if isinstance(bits, dict) else more(bits)
        return None if new == bits else config.replace(bits=new)

    return soften_


def _soften_weight_only(config: Config, factor: float) -> Config | None:
    return None if config.bits >= 8 else config.replace(bits=4 if config.bits == 2 else 8)


def _qat_oneshot(config: Config) -> Config:
    # QAT always trains; one step keeps the scan one-shot (calibration plus fake quantization).
    return config.replace(train=config.train.replace(max_steps=1))


def search_spaces() -> dict[str, TypeSpace]:
    """Config type name -> its search space (only types whose configs are known in this process)."""
    every = frozenset({"size", "macs", "latency"})
    spaces: dict[str, TypeSpace] = {
        "UnstructuredPruning": TypeSpace(
            fields=(FieldSpace("sparsity", low=0.0, high=0.99, mild=0.0, grid=SPARSITY_GRID, layers=_prunable),),
            apply=_apply_unstructured, oneshot=_no_schedule, soften=_soften_field("sparsity")),
        "StructuredPruning": TypeSpace(
            fields=(FieldSpace("ratio", low=0.0, high=0.9, mild=0.0, grid=RATIO_GRID, layers=_leaders,
                               valid=_all_leaders, reduces=every),),
            apply=_apply_structured, oneshot=_no_schedule, soften=_soften_field("ratio")),
        "SVD": _lowrank_space("rank", _linears),
        "Tucker": _lowrank_space("ranks", _convs),
        "CP": _lowrank_space("rank", _cp_convs),
        # Weight sharing: bits per layer; 0 leaves a layer's float weights alone.
        "WeightSharing": TypeSpace(
            fields=(FieldSpace("bits", low=0, high=8, mild=0, grid=(8, 6, 5, 4, 3, 2), layers=_shareable,
                               encode=_bits_or_none, choices=(0, 8, 6, 5, 4, 3, 2)),),
            apply=_apply_sharing, oneshot=lambda c: c.replace(finetune=None), soften=_soften_bits(14)),
        "QAT": TypeSpace(
            fields=(FieldSpace("bits", low=2, high=8, mild=8, grid=(6, 4, 3, 2), encode=lambda v, p: int(v),
                               choices=(8, 6, 4, 3, 2)),),
            apply=lambda c, v: c.replace(**v), oneshot=_qat_oneshot, soften=_soften_bits(8)),
        # Weight-only quantization has packed kernels for 8, 4 and 2 bits only.
        "WeightOnly": TypeSpace(
            fields=(FieldSpace("bits", low=2, high=8, mild=8, grid=(4, 2), encode=lambda v, p: int(v),
                               choices=(8, 4, 2)),),
            apply=lambda c, v: c.replace(**v), oneshot=lambda c: c, soften=_soften_weight_only),
    }
    known = config_types()
    return {name: space for name, space in spaces.items() if name in known}


# ----------------------------------------------------------------------------------------------
# Knobs


def build_knobs(stages: Sequence, model: nn.Module, example_inputs: tuple) -> list[Knob]:
    """Every knob the stages allow (``StageSpec.search`` False freezes a stage, a tuple limits its fields).

    Per-layer knobs use the layer names of ``model``; after a stage that renames layers (a decomposition),
    later stages get one knob per field instead (when the field also takes a single value)."""
    spaces = search_spaces()
    knobs: list[Knob] = []
    renamed = False
    for i, stage in enumerate(stages):
        space = spaces.get(type(stage.config).__name__)
        if space is None:
            continue
        if stage.search is not False:
            for fs in space.fields:
                if isinstance(stage.search, tuple) and fs.field not in stage.search:
                    continue
                common = dict(stage=i, stage_name=stage.name, field=fs.field, low=fs.low, high=fs.high,
                              mild=fs.mild, grid=fs.grid, choices=fs.choices, encode=fs.encode)
                if fs.layers is None or renamed:
                    if fs.scalar_ok:
                        knobs.append(Knob(layer=None, **common))
                    continue
                for layer, param in fs.layers(stage.config, model, example_inputs):
                    knobs.append(Knob(layer=layer, param=param, **common))
        renamed = renamed or space.renames_layers
    return knobs


def stage_configs(stages: Sequence, knobs: Sequence[Knob], values: dict[str, float]) -> list[Config | None]:
    """Each stage's config with the knob ``values`` (by knob name) filled in; None where a stage does nothing.
    Knobs missing from ``values`` take their mild value."""
    spaces = search_spaces()
    out: list[Config | None] = []
    for i, stage in enumerate(stages):
        mine = [k for k in knobs if k.stage == i]
        if not mine:
            out.append(stage.config)
            continue
        fields: dict[str, Any] = {}
        for k in mine:
            encoded = k.encode(values.get(k.name, k.mild), k.param)
            if k.layer is None:
                fields[k.field] = encoded
            else:
                entry = fields.setdefault(k.field, {})
                if encoded is not None:
                    entry[k.layer] = encoded
        out.append(spaces[type(stage.config).__name__].apply(stage.config, fields))
    return out


def soften(config: Config, factor: float) -> Config | None:
    """``config`` with its rates moved towards no compression by ``factor`` (None: it has none to soften)."""
    space = search_spaces().get(type(config).__name__)
    if space is None:
        return None
    try:
        return space.soften(config, factor)
    except ConfigError:
        return None


# ----------------------------------------------------------------------------------------------
# Measuring


def _batches(loader, device: torch.device) -> list[tuple[torch.Tensor, Any]]:
    out = []
    for batch in loader:
        x, y = (batch[0], batch[1] if len(batch) > 1 else None) if isinstance(batch, (tuple, list)) else (batch, None)
        out.append((x.to(device), y))
    return out


@torch.no_grad()
def _outputs(model: nn.Module, batches: list) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    try:
        return [model(x).detach().float().cpu() for x, _ in batches]
    finally:
        model.train(was)


def output_error(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Relative squared error of ``outputs`` against ``reference``: sum((o - r)^2) / sum(r^2)."""
    num = sum(float(((o - r) ** 2).sum()) for o, r in zip(outputs, reference))
    den = sum(float((r ** 2).sum()) for r in reference)
    return num / max(den, 1e-30)


def _top1(outputs: list[torch.Tensor], batches: list) -> float | None:
    if any(y is None for _, y in batches):
        return None
    correct = sum(int((o.argmax(1) == y.cpu()).sum()) for o, (_, y) in zip(outputs, batches))
    return correct / max(1, sum(len(y) for _, y in batches))


def knob_sensitivity(model: nn.Module, stages: Sequence, knobs: Sequence[Knob], data, example_inputs: tuple, *,
                     metric_fn: Callable, objective_fn: Callable[[nn.Module], float],
                     apply: Callable | None = None, progress: bool = True) -> dict[str, Any]:
    """One-shot scan for the search: each knob alone at each grid value (its stage without fine-tuning, every
    other knob mild) on ``model``; per point the relative output error and metric on ``data.val`` and the
    objective. Returns ``{"baseline": {...}, "knobs": {name: [{"value", "error", "metric", "objective"}]}}``."""
    from ..metrics import evaluate
    from ..metrics.evaluate import model_device
    from ..pipeline.runner import apply_stage

    apply = apply or apply_stage
    spaces = search_spaces()
    batches = _batches(data.val, model_device(model))
    reference = _outputs(model, batches)

    def score(m: nn.Module) -> tuple[float, float]:
        outs = _outputs(m, batches)
        acc = _top1(outs, batches) if metric_fn is evaluate else None
        return output_error(outs, reference), (acc if acc is not None else float(metric_fn(m, data.val)))

    base_metric = score(model)[1]
    result: dict[str, Any] = {"baseline": {"metric": base_metric, "objective": float(objective_fn(model))},
                              "knobs": {k.name: [] for k in knobs}}
    points = [(k, v) for k in knobs for v in k.grid]
    bar = tqdm(points, desc="sensitivity", disable=None if progress else True, leave=False, dynamic_ncols=True)
    for knob, value in bar:
        stage = stages[knob.stage]
        config = stage_configs([stage], [dataclasses.replace(knob, stage=0)], {knob.name: value})[0]
        if config is None:
            continue
        config = spaces[type(config).__name__].oneshot(config)
        try:
            compressed = apply(model, config, data, example_inputs, teacher=model)
        except (ConfigError, UnsupportedModelError) as exc:
            raise ConfigError(f"one-shot scan of {knob.name} at {value}: {exc}") from None
        error, metric = score(compressed)
        result["knobs"][knob.name].append(
            {"value": value, "error": error, "metric": metric, "objective": float(objective_fn(compressed))})
    bar.close()
    return result


# ----------------------------------------------------------------------------------------------
# The user-facing per-layer scan


@dataclasses.dataclass
class SensitivityResult:
    """Rows ``{"layer", "kind" ("sparsity" or "bits"), "value", "metric", "drop", "output_error"}``."""

    baseline: float
    metric: str
    rows: list[dict[str, Any]]

    def layers(self) -> list[str]:
        return list(dict.fromkeys(r["layer"] for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "baseline": self.baseline, "rows": self.rows}

    def to_markdown(self) -> str:
        lines = [f"# Sensitivity ({self.metric} on the validation split, baseline {self.baseline:.4f})", "",
                 "Each layer alone, one-shot (no fine-tuning). Cells: metric drop / relative output error.", ""]
        for kind, title in (("sparsity", "Unstructured sparsity (magnitude)"),
                            ("bits", "Weight bits (symmetric, per output channel)")):
            rows = [r for r in self.rows if r["kind"] == kind]
            if not rows:
                continue
            values = list(dict.fromkeys(r["value"] for r in rows))
            lines += [f"## {title}", "", "| layer | " + " | ".join(f"{v:g}" for v in values) + " |",
                      "|---|" + "---:|" * len(values)]
            for layer in self.layers():
                cells = {r["value"]: r for r in rows if r["layer"] == layer}
                lines.append(f"| {layer} | " + " | ".join(
                    f"{cells[v]['drop']:+.4f} / {cells[v]['output_error']:.2e}" if v in cells else "-"
                    for v in values) + " |")
            lines.append("")
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        """PNG: per layer, the metric against sparsity and against bits."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        kinds = [k for k in ("sparsity", "bits") if any(r["kind"] == k for r in self.rows)]
        fig, axes = plt.subplots(1, max(1, len(kinds)), figsize=(6 * max(1, len(kinds)), 4), dpi=100, squeeze=False)
        for ax, kind in zip(axes[0], kinds):
            for layer in self.layers():
                rows = [r for r in self.rows if r["kind"] == kind and r["layer"] == layer]
                ax.plot([r["value"] for r in rows], [r["metric"] for r in rows], "o-", label=layer, markersize=3)
            ax.axhline(self.baseline, color="grey", linestyle=":", linewidth=1)
            ax.set_xlabel("sparsity" if kind == "sparsity" else "weight bits")
            if kind == "bits":
                ax.invert_xaxis()
            ax.set_ylabel(self.metric)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle("one-shot sensitivity per layer (validation split)")
        fig.tight_layout()
        return save_figure(fig, path)

    def write(self, out_dir: str | Path) -> dict[str, Path]:
        """sensitivity.json, sensitivity.md and sensitivity.png in ``out_dir``, each written atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "sensitivity.json", "markdown": out / "sensitivity.md", "plot": out / "sensitivity.png"}
        self.plot(paths["plot"])
        atomic_write(paths["json"], (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        md = self.to_markdown() + f"\n![sensitivity]({paths['plot'].name})\n"
        atomic_write(paths["markdown"], md.encode())
        return paths


def _fake_quant(weight: torch.Tensor, bits: int) -> torch.Tensor:
    from ..quantization.spec import QuantSpec

    return QuantSpec(bits=bits, symmetric=True, granularity="channel", axis=0).fake_quantize(weight)


def _magnitude(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    n = round(sparsity * weight.numel())
    if n <= 0:
        return weight.clone()
    flat = weight.flatten().clone()
    flat[torch.topk(flat.abs(), n, largest=False, sorted=False).indices] = 0
    return flat.view_as(weight)


def sensitivity(model: nn.Module, data, *, sparsities: Iterable[float] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                bits: Iterable[int] = (8, 6, 4, 3, 2), layers: Sequence[str] | None = None,
                metric: Callable | None = None, metric_name: str = "accuracy",
                progress: bool = True) -> SensitivityResult:
    """Per layer, ``metric`` (default top-1 accuracy) and relative output error against unstructured sparsity
    and against weight bit width, one-shot: each layer alone, no fine-tuning. ``data`` is a loader or a
    :class:`~torchslim.data.Splits` (its ``val`` split is used, never ``test``). ``model`` is not modified.

    ``layers``: fnmatch patterns limiting the scan (default: every Linear / Conv layer)."""
    from ..data import Splits, check_loader
    from ..metrics import evaluate
    from ..metrics.evaluate import model_device
    from ..pruning.unstructured import make_permanent, prunable_layers

    loader = data.val if isinstance(data, Splits) else data
    check_loader(loader, "sensitivity data")
    sparsities, bits = [float(s) for s in sparsities], [int(b) for b in bits]
    for s in sparsities:
        if not 0 <= s < 1:
            raise ConfigError(f"sparsities must satisfy 0 <= s < 1, got {s}")
    work = make_permanent(copy_model(model)).eval()
    targets = prunable_layers(work)
    if layers:
        targets = {n: m for n, m in targets.items() if match(n, layers) is not None}
    if not targets:
        raise UnsupportedModelError(f"no Linear/Conv layer of {type(model).__name__} matches layers={layers}")
    metric_fn = metric or evaluate
    batches = _batches(loader, model_device(work))
    reference = _outputs(work, batches)

    def score() -> tuple[float, float]:
        outs = _outputs(work, batches)
        acc = _top1(outs, batches) if metric_fn is evaluate else None
        return (acc if acc is not None else float(metric_fn(work, loader))), output_error(outs, reference)

    baseline = score()[0]
    rows: list[dict[str, Any]] = []
    plan = [(n, "sparsity", s) for n in targets for s in sparsities] + [(n, "bits", b) for n in targets for b in bits]
    bar = tqdm(plan, desc="sensitivity", disable=None if progress else True, leave=False, dynamic_ncols=True)
    for name, kind, value in bar:
        layer = targets[name]
        original = layer.weight.data.clone()
        try:
            layer.weight.data = _magnitude(original, value) if kind == "sparsity" else _fake_quant(original, value)
            m, err = score()
        finally:
            layer.weight.data = original
        rows.append({"layer": name, "kind": kind, "value": value, "metric": m, "drop": baseline - m,
                     "output_error": err})
    return SensitivityResult(baseline=baseline, metric=metric_name, rows=rows)
