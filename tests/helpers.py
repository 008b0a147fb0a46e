"""Small builders shared by test folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from infer_server.messages import WorkerOptions
from infer_server.settings import ServerSettings


def worker_options(**settings: Any) -> WorkerOptions:
    """The options a server with these settings gives its workers (every other value its default)."""
    return ServerSettings(**settings).worker_options()


def on_small_tmpfs(tmp_path: Path, script: str, options: str = "size=2m") -> subprocess.CompletedProcess[str]:
    """Run the Python ``script`` with a fresh tmpfs (``options``) mounted at its ``sys.argv[1]``, in
    a mount namespace of its own; skip the test where none can be made (needs unshare and root)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    shell = f'mount -t tmpfs -o {options} tmpfs "{mnt}" && exec "$0" -c "$1" "{mnt}"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, sys.executable, script],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}")
    return done
