"""Pruning configs: what to prune (unstructured / structured), how to score, when (schedule)."""

from __future__ import annotations

import dataclasses

from ..core.config import Config
from ..core.checks import check_choice, check_fraction, check_nonnegative, check_positive
from ..core.errors import ConfigError
from ..training.train import TrainConfig
from .importance import IMPORTANCES, importance_names


@dataclasses.dataclass(frozen=True)
class Schedule(Config):
    """When pruning happens.

    - ``oneshot``: prune to the target at once, then fine-tune once (if ``finetune`` is set);
    - ``iterative``: ``steps`` rounds of (prune a further share -> fine-tune), reaching the target at the end;
    - ``gradual``: sparsity follows the cubic ramp of Zhu & Gupta (2017) during one fine-tuning run, updated
      ``steps`` times (structured pruning removes channels at those points, fine-tuning in between).
    """

    kind: str = "oneshot"
    steps: int = 1
    finetune: TrainConfig | None = None

    def validate(self) -> None:
        check_choice("schedule.kind", self.kind, ("oneshot", "iterative", "gradual"))
        check_positive("schedule.steps", self.steps, integer=True)
        if self.kind != "oneshot" and self.finetune is None:
            raise ConfigError(f"schedule.kind={self.kind!r} fine-tunes between steps: set schedule.finetune "
                              "to a TrainConfig (and pass data= to prune)")


def _check_rates(name: str, value, allow_dict: bool = True) -> None:
    if isinstance(value, dict) and allow_dict:
        if not value:
            raise ConfigError(f"{name}: per-layer mapping is empty")
        for layer, v in value.items():
            check_fraction(f"{name}[{layer!r}]", v)
    else:
        check_fraction(name, value)


UNSTRUCTURED_METHODS = ("magnitude", "hessian", "obs")


def _check_second_order(config) -> None:
    check_choice("method", config.method, UNSTRUCTURED_METHODS)
    check_positive("calibration_batches", config.calibration_batches, integer=True)
    check_fraction("damp", config.damp, allow_zero=False, allow_one=True)
    if config.method != "magnitude" and config.schedule.kind == "gradual":
        raise ConfigError(f"method={config.method!r} prunes from data at each step; the gradual schedule updates "
                          "masks inside the training loop by magnitude. Use schedule kind 'oneshot' or 'iterative'")


@dataclasses.dataclass(frozen=True)
class UnstructuredPruning(Config):
    """Zero individual weights.

    ``sparsity`` is the fraction of weights to zero: one number (for the whole model when
    ``scope="global"``, for every layer when ``scope="layer"``) or a mapping {layer name: sparsity}.
    Linear and Conv layers are pruned; ``exclude`` names layers (fnmatch patterns) to leave dense.
    ``method``: ``magnitude`` (smallest |w|), ``hessian`` (Optimal Brain Damage: smallest ``w^2 * H_jj / 2``,
    ``H_jj`` the Fisher diagonal from ``calibration_batches`` batches of ``data``) or ``obs`` (SparseGPT:
    layer-wise Optimal Brain Surgeon that also updates the remaining weights to reconstruct each layer's
    outputs on ``calibration_batches`` batches, one-shot; with ``scope="global"`` the global magnitude ranking
    sets each layer's share). ``damp`` is the dampening added to the layer Hessians (share of their mean
    diagonal).
    """

    sparsity: float | dict[str, float] = 0.5
    scope: str = "global"
    exclude: tuple[str, ...] = ()
    schedule: Schedule = Schedule()
    method: str = "magnitude"
    calibration_batches: int = 8
    damp: float = 0.01

    def validate(self) -> None:
        _check_rates("sparsity", self.sparsity)
        check_choice("scope", self.scope, ("global", "layer"))
        if isinstance(self.sparsity, dict) and self.scope == "global":
            object.__setattr__(self, "scope", "layer")
        _check_second_order(self)


@dataclasses.dataclass(frozen=True)
class SemiStructuredPruning(Config):
    """N:M semi-structured sparsity: in every run of ``m`` consecutive inputs of a weight row, keep ``n``
    (2:4 by default, the pattern sparse tensor cores run at up to 2x). Conv kernels are grouped along their
    flattened (in_channels, kh, kw) rows; layers whose row length is not a multiple of ``m`` stay dense with a
    warning naming them. ``method`` picks the weights as in :class:`UnstructuredPruning` (``obs`` also
    reconstructs). The masks stay fixed while the schedule's ``finetune`` trains (kind ``oneshot`` only).
    """

    n: int = 2
    m: int = 4
    method: str = "magnitude"
    exclude: tuple[str, ...] = ()
    calibration_batches: int = 8
    damp: float = 0.01
    schedule: Schedule = Schedule()

    def validate(self) -> None:
        check_positive("n", self.n, integer=True)
        check_positive("m", self.m, integer=True)
        if self.n >= self.m:
            raise ConfigError(f"N:M sparsity keeps n of every m weights: n must be < m, got n={self.n}, m={self.m} "
                              "(2:4 is n=2, m=4)")
        if self.m > 8:
            raise ConfigError(f"m={self.m}: groups of at most 8 are supported (2:4 and 4:8 are the hardware ones)")
        if self.schedule.kind != "oneshot":
            raise ConfigError(f"SemiStructuredPruning reaches its pattern in one step; schedule.kind must be "
                              f"'oneshot' (with finetune= for fixed-mask training), got {self.schedule.kind!r}")
        _check_second_order(self)


@dataclasses.dataclass(frozen=True)
class StructuredPruning(Config):
    """Remove whole output channels / filters / neurons for real, consistently across coupled layers.

    ``ratio`` is the fraction of channels removed from every prunable group (or {layer name: ratio}).
    ``importance``: ``l1``/``l2`` weight magnitude, ``taylor`` (|gradient x weight| summed over
    ``importance_batches`` batches of ``data``), ``bn_scale`` (|BatchNorm gamma|, network slimming) or a
    name registered with ``torchslim.pruning.register_importance``.
    ``scope="global"`` ranks channels across all groups (normalised per group) instead of per group, with
    ``ratio`` the overall share and no group losing more than ``max_ratio``.
    ``round_to`` keeps channel counts multiples of it (hardware friendly). ``bn_penalty`` adds an L1
    penalty on BN scales during the schedule's fine-tuning (network slimming, Liu et al. 2017).
    ``exclude`` names layers (fnmatch patterns) whose output channels are kept.
    ``hidden_ratio`` (``transformers`` models only) also removes that share of the hidden size: the residual
    stream's channels in the embeddings, every layer, the norms and the heads (see :mod:`torchslim.hf.width`).
    """

    ratio: float | dict[str, float] = 0.5
    importance: str = "l1"
    scope: str = "layer"
    max_ratio: float = 0.9
    round_to: int = 1
    importance_batches: int = 4
    bn_penalty: float = 0.0
    exclude: tuple[str, ...] = ()
    schedule: Schedule = Schedule()
    hidden_ratio: float = 0.0

    def validate(self) -> None:
        _check_rates("ratio", self.ratio)
        check_fraction("hidden_ratio", self.hidden_ratio)
        if not isinstance(self.importance, str) or self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {importance_names()} or a name registered with "
                              f"torchslim.pruning.register_importance, got {self.importance!r}")
        check_choice("scope", self.scope, ("layer", "global"))
        check_fraction("max_ratio", self.max_ratio)
        check_positive("round_to", self.round_to, integer=True)
        check_positive("importance_batches", self.importance_batches, integer=True)
        check_nonnegative("bn_penalty", self.bn_penalty)
