"""Channel layouts of the tracer (where a tensor's channel dim is and which channel spaces it holds), the
tensor slices (members) its groups are made of and the kinds of reasons that block a group."""

from __future__ import annotations

import dataclasses
from typing import Iterator


@dataclasses.dataclass(frozen=True)
class Seg:
    """``n`` channel slots of ``rep`` consecutive indices each, all from channel space ``space``."""

    space: int
    n: int
    rep: int


@dataclasses.dataclass(frozen=True)
class Layout:
    """The channel dim ``dim`` of a tensor, as consecutive segments."""

    dim: int
    segs: tuple[Seg, ...]

    @property
    def width(self) -> int:
        return sum(s.n * s.rep for s in self.segs)

    def with_offsets(self) -> Iterator[tuple[int, Seg]]:
        off = 0
        for s in self.segs:
            yield off, s
            off += s.n * s.rep

    def signature(self) -> tuple:
        return tuple((s.n, s.rep) for s in self.segs)


# Reason kinds; only "unsupported" is worth a warning (the others are by design or asked for).
OUTPUT, INPUT, UNSUPPORTED, EXCLUDED = "output", "input", "unsupported", "excluded"


@dataclasses.dataclass(frozen=True)
class Member:
    """One tensor slice of a group: channel slot ``k`` is indices ``offset + k*rep ... offset + (k+1)*rep - 1``
    of dim ``dim`` of ``<module>.<param>``. ``param == ""`` marks a layer with no per-channel tensor
    whose channel count (``num_features``/``normalized_shape``) still changes. ``role`` is ``"out"`` (a
    layer's output channels), ``"in"`` (a layer's input channels) or ``"norm"`` (a per-channel op)."""

    module: str
    param: str
    dim: int
    offset: int
    rep: int
    role: str

    def describe(self) -> str:
        where = f"{self.module}.{self.param}" if self.param else f"{self.module} (channel count)"
        extra = f", offset {self.offset}" if self.offset else ""
        extra += f", {self.rep} indices per channel" if self.rep != 1 else ""
        return f"{where} dim {self.dim} [{self.role}{extra}]"
