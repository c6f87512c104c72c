"""Channel spaces of the tracer: a union-find over sets of coupled channel slots, their members and the
reasons that block them, and ties that map a space onto another (grouped convs, attention heads)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .layout import UNSUPPORTED, Layout, Member

__all__ = ["Spaces", "merged_dims", "unit_dims_moved", "constant_size"]


class Spaces:
    """Channel spaces: ``sizes[i]`` slots each; ``members[i]`` lists ``(order, Member)`` tensor slices and
    ``reasons[i]`` ``(kind, why)`` pairs that keep the space whole."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.sizes: list[int] = []
        self.members: list[list[tuple[int, Member]]] = []
        self.reasons: list[list[tuple[str, str]]] = []
        self.ties: list[tuple[int, int, int, int]] = []  # see tie()
        self.order = 0

    def new_space(self, n: int, reason: tuple[str, str] | None = None) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(n)
        self.members.append([])
        self.reasons.append([reason] if reason else [])
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:  # keep the oldest space as root so the group's leader is its first producer
            a, b = b, a
        self.parent[b] = a
        self.members[a] += self.members[b]
        self.reasons[a] += self.reasons[b]
        self.members[b], self.reasons[b] = [], []

    def block(self, layout: Layout | None, kind: str, why: str) -> None:
        if layout is not None:
            for s in layout.segs:
                self.reasons[self.find(s.space)].append((kind, why))

    def add(self, space: int, member: Member) -> None:
        self.members[self.find(space)].append((self.order, member))

    def tie(self, space: int, positions: int, m: int, f: int = 1) -> None:
        """Map ``space`` onto ``positions`` (``m`` slots): its slot ``k`` joins slot ``(k // f) % m``. ``f = 1``:
        a grouped conv reads the same positions in each group, so channels go block by block alike; ``m * f``
        = its size: ``f`` consecutive slots make one (an attention head of ``f`` channels)."""
        self.ties.append((space, positions, m, f))

    def resolve_ties(self) -> tuple[dict[int, int], dict[int, list[tuple[int, Member]]]]:
        """Fold every tied space into its target: a member over ``n`` slots becomes ``n / (m * f)`` members over
        the ``m`` target slots, each index ``f`` times wider. Returns {tied root: target root}, added members."""
        tied: dict[int, tuple[int, int, int]] = {}
        pending = list(self.ties)
        while pending:
            space, positions, m, f = pending.pop(0)
            root = self.find(space)
            if root not in tied:
                tied[root] = (positions, m, f)
                continue
            other, m0, f0 = tied[root]
            if (m0, f0) == (m, f):
                self.union(other, positions)
            elif f == f0 == 1:  # read by grouped convs of different group sizes: the positions common to both
                common = self.new_space(math.gcd(m, m0))
                tied[root] = (common, self.sizes[common], 1)
                pending += [(other, common, self.sizes[common], 1), (positions, common, self.sizes[common], 1)]
            else:  # the other op's positions then lead no group: nothing of it is sliced
                self.reasons[self.find(other)].append(
                    (UNSUPPORTED, "channels split into attention heads and also into groups or other heads"))
        extra: dict[int, list[tuple[int, Member]]] = {}
        where: dict[int, int] = {}
        # Targets are newer spaces than what is tied to them: folding in index order moves members on along chains.
        for key in sorted(tied):
            root = self.find(key)
            if root in where:
                continue
            positions, m, f = tied[key]
            target = self.find(positions)
            where[root] = target
            for order, mem in self.members[root] + extra.pop(root, []):
                for b in range(self.sizes[root] // (m * f)):
                    extra.setdefault(target, []).append((order, dataclasses.replace(
                        mem, offset=mem.offset + b * m * f * mem.rep, rep=mem.rep * f)))
            self.reasons[target] += self.reasons[root]
        return where, extra


def merged_dims(src: tuple, dst: tuple, channel: int | None) -> tuple[int, int] | None:
    """``(start, end)`` when ``dst`` is ``src`` with dims start..end merged, not splitting the channel dim."""
    for start in range(len(src)):
        for end in range(start + 1, len(src)):
            merged = src[:start] + (math.prod(src[start:end + 1]),) + src[end + 1:]
            if merged == dst and (channel is None or not start < channel <= end):
                return start, end
    return None


def unit_dims_moved(src: tuple, dst: tuple, channel: int) -> int | None:
    """Where the channel dim lands when ``dst`` only adds or drops dims of size 1 (``(b, c)`` ->
    ``(b, c, 1, 1)``), or None."""
    if src[channel] == 1 or [d for d in src if d != 1] != [d for d in dst if d != 1]:
        return None
    rank = sum(d != 1 for d in src[:channel])
    return [i for i, d in enumerate(dst) if d != 1][rank]


def constant_size(size: Any) -> bool:
    """A size written as a literal in the forward (not -1, not computed from a tensor's size)."""
    return isinstance(size, int) and size != -1
