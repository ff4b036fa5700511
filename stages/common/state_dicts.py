"""Reading checkpoints, and checking their tensors against the model they are loaded into."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

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


class UnreadableCheckpoint(ValueError):
    """A file that ``torch.load`` cannot read as a checkpoint of tensors (another kind of file, one cut
    short, or a pickle of more than tensors and containers)."""


def read_torch_file(path: str | Path) -> Any:
    """``torch.load`` of ``path`` onto the CPU with ``weights_only=True`` (tensors, containers, numbers: no
    code runs).

    Raises:
        FileNotFoundError: no such file.
        UnreadableCheckpoint: anything else torch cannot read; the message names the file and torch's
            reason in one line.
    """
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many types for a file that is not a checkpoint; all mean that here
        raise UnreadableCheckpoint(f"cannot read '{path}' as a torch checkpoint ({_reason(e)})") from e


def _reason(error: Exception) -> str:
    """Torch's reason in one short line. Not its whole text: for a weights-only unpickling failure that
    ends in advice to load the file with code execution on."""
    if isinstance(error, pickle.UnpicklingError):
        return "UnpicklingError: not a pickle of tensors and containers"
    text = str(error).strip()
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__
