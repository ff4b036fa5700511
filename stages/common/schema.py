"""Config sections as typed, validated dataclasses (pydantic): the shared pieces.

Each component declares its own section where it is defined (a method its ``Config``, the backbone its
``BackboneConfig``, ...) with ``@section``: a frozen pydantic dataclass that rejects unknown keys and checks
types when built. Checks that need several fields, or the key's full dotted name, are in the section's
``validate(key)``, called once the whole config is built. Values never have defaults here: they live in the
YAML files under ``configs/``.
"""

from __future__ import annotations

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass

# extra="forbid": an unknown key is an error; frozen: a resolved config is not changed behind a stage's back.
section = dataclass(frozen=True, config=ConfigDict(extra="forbid"))


class ConfigError(ValueError):
    """A configuration problem, with the dotted key it concerns."""


def fail(key: str, msg: str) -> None:
    raise ConfigError(f"config key '{key}': {msg}")


def positive(key: str, value: float) -> None:
    if value <= 0:
        fail(key, f"must be > 0, got {value}")
