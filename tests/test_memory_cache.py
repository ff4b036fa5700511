"""The byte-budget cache the frozen-feature trainings share (pipeline/memory_cache.py)."""

from pipeline.memory_cache import BudgetCache

MB = 2**20


def test_least_recently_used_values_go_first_and_oversized_ones_are_never_kept():
    cache: BudgetCache[str, int] = BudgetCache(3, size=lambda mb: mb * MB)
    for key in "abc":
        cache.put(key, 1)
    cache.get("a")  # b is now the least recently used
    cache.put("d", 1)
    assert [k for k in "abcd" if k in cache] == ["a", "c", "d"] and cache.used == 3 * MB
    cache.put("c", 1)  # kept already: only refreshed, not counted twice
    cache.put("e", 2)
    assert [k for k in "acde" if k in cache] == ["c", "e"] and cache.used == 3 * MB
    cache.put("f", 4)  # larger than the whole budget
    assert "f" not in cache and cache.used == 3 * MB


def test_a_zero_budget_keeps_nothing_of_any_size():
    cache: BudgetCache[str, int] = BudgetCache(0, size=lambda n: n)
    cache.put("x", 1)
    assert "x" not in cache and cache.used == 0
