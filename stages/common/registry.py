"""Registries: components chosen by name in a config (discovery methods, refiners, dataset kinds).

In the style of detectron2's ``Registry``: a component registers itself with a decorator where it is
defined, and the code that runs it asks the registry by name instead of branching on names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from stages.common.schema import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> component. ``what`` names the kind of component in error messages."""

    def __init__(self, what: str):
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")`` above a class or function. A name is registered once."""

        def add(item: T) -> T:
            if name in self._items and self._items[name] is not item:
                raise ValueError(f"{self.what} '{name}' is already registered ({self._items[name]!r})")
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        """The component registered as ``name``; ConfigError listing the known names otherwise."""
        if name not in self._items:
            raise ConfigError(f"unknown {self.what} '{name}' (known: {', '.join(self.names())})")
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[tuple[str, T]]:
        return iter(sorted(self._items.items()))
