"""Checking a checkpoint's tensors against the model they are loaded into."""

from __future__ import annotations

from collections.abc import Iterable

_LISTED = 5  # keys spelled out per kind in a message


def key_mismatch(expected: Iterable[str], given: Iterable[str]) -> str:
    """'' when the two key sets are equal, else 'missing keys [...], unexpected keys [...]' (the first few
    of each, sorted), for an error naming what does not fit."""
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not missing and not unexpected:
        return ""
    return (
        f"missing keys {missing[:_LISTED]}{'...' if len(missing) > _LISTED else ''}, "
        f"unexpected keys {unexpected[:_LISTED]}{'...' if len(unexpected) > _LISTED else ''}"
    )
