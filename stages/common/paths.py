"""Where the repository's own files are: computed once, here."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
DETECTRON_CONFIGS = REPO_ROOT / "detectron_configs"


def resolve(path: str | Path) -> Path:
    """A user path: ``~`` expanded; a relative path is taken from the repository root (as configs write
    them), not from the current directory."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p
