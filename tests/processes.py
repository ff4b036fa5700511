"""Running the pipeline's CLI in a child process, for tests that kill a run at a deterministic point."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys


def run_pipeline(command: str, args: list[str], env: dict[str, str]) -> int:
    """``python -m pipeline <command> args`` in its own session with its own local Ray and ``env`` added;
    returns its exit status (-9 when a test hook killed it). Whatever the process leaves behind (its Ray) is
    killed with its process group."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", command, *args],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_ADDRESS": "", **env},
    )
    try:
        return proc.wait(timeout=900)  # a safety net only: the tests' kill points are hooks
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
