"""Explicit name registries that refuse duplicates and can list and alias their entries."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from slimx._core.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object table.

    Example:
        >>> passes = Registry("pass")
        >>> @passes.register("noop")
        ... def noop(model): return model
        >>> passes.get("noop") is noop
        True
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def add(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return add

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> None:
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
        self._items[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def remove(self, name: str) -> None:
        """Forget ``name`` and its aliases (a plugin unregistering itself, e.g. a test's throwaway entry)."""
        self._items.pop(name, None)
        for alias in [a for a, n in self._aliases.items() if n == name]:
            del self._aliases[alias]

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        key = self._aliases.get(key, key)
        if key not in self._items:
            choices = sorted(self._items)
            close = difflib.get_close_matches(key, choices + sorted(self._aliases), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UsageError(
                f"unknown {self.kind} {name!r}",
                f"slimx knows {', '.join(choices)}",
                f"{hint}pick one of those",
            )
        return key

    def get(self, name: str) -> T:
        return self._items[self.canonical(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, n in self._aliases.items() if n == name)

    def __contains__(self, name: str) -> bool:
        key = name.strip().lower()
        return key in self._items or key in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
