"""Low-rank decomposition configs: SVD for Linear layers, Tucker-2 and CP for Conv2d layers.

Each picks ranks in exactly one way: an explicit rank (one for every layer, or {layer name: rank}),
``energy`` (keep that share of the squared singular values), ``ratio`` (the largest rank that keeps at
most that share of the layer's parameters) or ``max_drop`` (a per-layer sensitivity scan on data: the
smallest rank whose accuracy drop, measured with only that layer decomposed, is at most ``max_drop``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..core.config import Config
from ..core.checks import check_fraction, check_positive, check_range
from ..core.errors import ConfigError
from ..nn.modules import match


def _check_patterns(name: str, value: Any) -> None:
    if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a tuple of layer-name patterns (fnmatch), got {value!r}")


def _check_common(cfg: Any, rank_field: str, allow_energy: bool = True) -> None:
    """Shared validation: exactly one rank criterion, sane ranges."""
    chosen = [f for f in (rank_field, "energy", "ratio", "max_drop") if getattr(cfg, f, None) is not None]
    if len(chosen) != 1:
        options = f"{rank_field}=, " + ("energy=, " if allow_energy else "") + "ratio= or max_drop="
        raise ConfigError(f"{type(cfg).__name__}: set exactly one of {options} (got {chosen or 'none'})")
    if getattr(cfg, "energy", None) is not None:
        check_fraction("energy", cfg.energy, allow_zero=False, allow_one=True)
    if cfg.ratio is not None:
        check_fraction("ratio", cfg.ratio, allow_zero=False)
    if cfg.max_drop is not None:
        check_fraction("max_drop", cfg.max_drop)
    _check_patterns("layers", cfg.layers)
    _check_patterns("exclude", cfg.exclude)
    check_positive("scan_batches", cfg.scan_batches, integer=True)


def _check_rank(name: str, value: Any) -> None:
    check_positive(name, value, integer=True)


def _selection(cfg: Any, rank_field: str) -> str:
    if getattr(cfg, rank_field) is not None:
        return "rank"
    if getattr(cfg, "energy", None) is not None:
        return "energy"
    if cfg.ratio is not None:
        return "ratio"
    return "sensitivity"


@dataclasses.dataclass(frozen=True)
class SVD(Config):
    """Truncated SVD of Linear layers: ``Linear(in, out)`` -> ``Linear(in, r, bias=False)``, ``Linear(r, out)``.

    ``layers`` / ``exclude`` are fnmatch patterns of layer names to consider / leave alone (all Linear
    layers by default). ``require_saving`` leaves a layer alone (and says so in the report) when the
    decomposition would not reduce its parameters and MACs. ``scan_batches`` batches of ``data`` are used
    by the ``max_drop`` sensitivity scan.
    """

    rank: int | dict[str, int] | None = None
    energy: float | None = None
    ratio: float | None = None
    max_drop: float | None = None
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    require_saving: bool = True
    scan_batches: int = 4
    progress: bool = True

    @property
    def selection(self) -> str:
        return _selection(self, "rank")

    def validate(self) -> None:
        _check_common(self, "rank")
        if isinstance(self.rank, dict):
            if not self.rank:
                raise ConfigError("rank: per-layer mapping is empty")
            for layer, r in self.rank.items():
                _check_rank(f"rank[{layer!r}]", r)
        elif self.rank is not None:
            _check_rank("rank", self.rank)


def selected(config: Any, name: str) -> bool:
    """Whether layer ``name`` is one ``config.layers`` selects (all when empty) and ``config.exclude`` does not."""
    return (not config.layers or match(name, config.layers) is not None) and match(name, config.exclude) is None


def _tucker_pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an int or an (in_rank, out_rank) pair, got {value!r}")
        _check_rank(f"{name}[0] (in_rank)", value[0])
        _check_rank(f"{name}[1] (out_rank)", value[1])
        return int(value[0]), int(value[1])
    _check_rank(name, value)
    return int(value), int(value)


@dataclasses.dataclass(frozen=True)
class Tucker(Config):
    """Tucker-2 of Conv2d kernels over the input and output channel modes (Kim et al. 2016):
    ``Conv(Cin, Cout, k)`` -> ``Conv1x1(Cin, r_in)``, ``Conv k x k(r_in, r_out)`` (stride, padding and
    dilation of the original), ``Conv1x1(r_out, Cout)`` (with the original bias).

    ``ranks`` is ``(in_rank, out_rank)``, one int for both, or {layer name: either}. ``energy`` is applied
    to each mode's unfolding separately. ``ratio`` scales both ranks in proportion to the channel counts.
    Other fields as in :class:`SVD`; ``n_iter_max`` bounds tensorly's HOOI iterations.
    """

    ranks: int | tuple[int, int] | dict[str, Any] | None = None
    energy: float | None = None
    ratio: float | None = None
    max_drop: float | None = None
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    require_saving: bool = True
    scan_batches: int = 4
    n_iter_max: int = 100
    progress: bool = True

    @property
    def selection(self) -> str:
        return _selection(self, "ranks")

    def validate(self) -> None:
        _check_common(self, "ranks")
        check_positive("n_iter_max", self.n_iter_max, integer=True)
        if isinstance(self.ranks, dict):
            if not self.ranks:
                raise ConfigError("ranks: per-layer mapping is empty")
            normal = {layer: _tucker_pair(f"ranks[{layer!r}]", r) for layer, r in self.ranks.items()}
            object.__setattr__(self, "ranks", normal)
        elif self.ranks is not None:
            pair = _tucker_pair("ranks", self.ranks)
            object.__setattr__(self, "ranks", pair if isinstance(self.ranks, (list, tuple)) else int(self.ranks))


@dataclasses.dataclass(frozen=True)
class CP(Config):
    """CP (canonical polyadic) decomposition of Conv2d kernels (Lebedev et al. 2015): ``Conv1x1(Cin, R)``,
    depthwise ``k x 1`` and ``1 x k`` convolutions (groups=R, carrying stride/padding/dilation),
    ``Conv1x1(R, Cout)`` with the original bias.

    Fitted with tensorly's ALS (``parafac``, SVD initialisation, ``n_iter_max`` iterations, tolerance
    ``tol``, seeded by ``seed``); CP fits can be poor, so the report gives each layer's relative
    reconstruction error. Rank by ``rank``, ``ratio`` or ``max_drop`` (CP has no energy criterion).
    """

    rank: int | dict[str, int] | None = None
    ratio: float | None = None
    max_drop: float | None = None
    energy: float | None = None  # not supported; present to say so clearly
    layers: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    require_saving: bool = True
    scan_batches: int = 4
    n_iter_max: int = 300
    tol: float = 1e-7
    seed: int = 0
    progress: bool = True

    @property
    def selection(self) -> str:
        return _selection(self, "rank")

    def validate(self) -> None:
        if self.energy is not None:
            raise ConfigError("CP has no energy criterion (its factors are not ordered by singular values): "
                              "use rank=, ratio= or max_drop=, or Tucker(energy=...)")
        _check_common(self, "rank", allow_energy=False)
        check_positive("n_iter_max", self.n_iter_max, integer=True)
        check_positive("tol", self.tol)
        check_range("seed", self.seed, 0, 2**32 - 1, integer=True)  # what numpy's random_state takes
        if isinstance(self.rank, dict):
            if not self.rank:
                raise ConfigError("rank: per-layer mapping is empty")
            for layer, r in self.rank.items():
                _check_rank(f"rank[{layer!r}]", r)
        elif self.rank is not None:
            _check_rank("rank", self.rank)


__all__ = ["SVD", "Tucker", "CP"]
