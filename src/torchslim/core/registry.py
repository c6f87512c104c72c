"""A small name -> value registry that refuses silent replacement."""

from __future__ import annotations

from typing import Generic, Hashable, Iterator, TypeVar

from .errors import ConfigError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Registry(Generic[K, V]):
    """Values by key; adding a key twice is an error unless ``replace=True`` says it is meant.

    ``what`` names the kind of entry in error messages ("importance criterion", "technique", ...)."""

    def __init__(self, what: str, items: dict[K, V] | None = None):
        self.what = what
        self._items: dict[K, V] = {}
        for key, value in (items or {}).items():
            self.add(key, value)

    def add(self, key: K, value: V, *, replace: bool = False) -> V:
        if key in self._items and not replace:
            raise ConfigError(f"{self.what} {_name(key)} is already registered; pass replace=True to replace it")
        self._items[key] = value
        return value

    def get(self, key: K) -> V:
        try:
            return self._items[key]
        except KeyError:
            known = ", ".join(sorted(_name(k) for k in self._items))
            raise ConfigError(f"unknown {self.what} {_name(key)}; known: {known}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self):
        return self._items.items()

    def values(self):
        return self._items.values()

    def copy(self) -> "Registry[K, V]":
        new = object.__new__(type(self))
        new.what = self.what
        new._items = dict(self._items)
        return new


def _name(key: object) -> str:
    return repr(key.__name__) if isinstance(key, type) else repr(key)
