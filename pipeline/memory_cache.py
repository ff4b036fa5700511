"""A cache of values held in memory up to a byte budget, least recently used out first: the frozen features
that trainings on frozen backbones (SOLV's model, FOUND's head) reuse between steps."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BudgetCache(Generic[K, V]):
    """Values by key, kept while their sizes (``size(value)``, bytes) add up to at most ``budget_mb``
    mebibytes; a value larger than the whole budget is never kept (a budget of 0 keeps no value of any
    size above 0)."""

    def __init__(self, budget_mb: int, size: Callable[[V], int]):
        self.budget = budget_mb * 2**20
        self.size = size
        self.values: OrderedDict[K, V] = OrderedDict()
        self.used = 0

    def __contains__(self, key: K) -> bool:
        return key in self.values

    def get(self, key: K) -> V:
        """The value of ``key`` (KeyError when not kept), now the most recently used."""
        self.values.move_to_end(key)
        return self.values[key]

    def put(self, key: K, value: V) -> None:
        """Keep ``value`` (a key already kept only becomes the most recently used), then drop the least
        recently used values until the budget holds."""
        if key in self.values:
            self.values.move_to_end(key)
            return
        size = self.size(value)
        if size > self.budget:
            return
        self.values[key] = value
        self.used += size
        while self.used > self.budget:
            _, old = self.values.popitem(last=False)
            self.used -= self.size(old)
