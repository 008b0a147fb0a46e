"""The instructions a null-model stage worker executes per chunk, counted by callgrind.

``benchmarks.instructions`` counts the main process's; this counts a worker's ``handle_group`` of
one chunk of ``images`` scenes in a tmpfs batch file, as the pool hands it over: the read through
the owner's descriptor, the header checks, the outcomes, the answer written to a pipe (a thread
drains it, counted too). The loop runs under ``valgrind --tool=callgrind`` twice, ``short`` and
``long`` chunks, and the difference over ``long - short`` chunks is the count per chunk, start-up
and warm-up cancelled out. The same revision counts the same within about 2% (the draining
thread's share varies with how the two threads interleave), so two revisions compare by running
this in each tree::

    .venv/bin/python -m benchmarks.worker_instructions --images 8
    PYTHONPATH=<other tree>/src .venv/bin/python -m benchmarks.worker_instructions   # another revision

Needs valgrind (Debian's ``valgrind`` package).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from benchmarks import hotpaths, servers


def _loop(images: int, chunks: int) -> None:
    """``chunks`` chunks of ``images`` images through one worker, in this process."""
    with hotpaths.null_worker(images) as chunk:
        for _ in range(chunks):
            chunk()


def _count(images: int, chunks: int, out: Path) -> int:
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m",
           "benchmarks.worker_instructions", "--images", str(images), "--loop", str(chunks)]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=1800, cwd=servers.REPO_ROOT)
    counts = re.findall(r"^(?:summary|totals):\s*(\d+)", out.read_text(errors="replace"), re.MULTILINE)
    return max(int(n) for n in counts)


def main(
    images: Annotated[int, typer.Option(help="Images per chunk.")] = 8,
    short: Annotated[int, typer.Option(help="Chunks of the shorter run.")] = 200,
    long: Annotated[int, typer.Option(help="Chunks of the longer run.")] = 1200,
    loop: Annotated[int, typer.Option(help="Run this many chunks here, uncounted (what callgrind runs).")] = 0,
) -> None:
    """A worker's instructions per chunk and per image."""
    if loop:
        _loop(images, loop)
        return
    if not shutil.which("valgrind"):
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    if long <= short:
        raise typer.BadParameter("--long must be more than --short")
    with tempfile.TemporaryDirectory() as tmp:
        few, many = (_count(images, n, Path(tmp) / f"callgrind.{n}") for n in (short, long))
    per_chunk = (many - few) / (long - short)
    print(f"worker: {per_chunk:,.0f} instructions per chunk of {images} ({per_chunk / images:,.0f} per image)")


if __name__ == "__main__":
    typer.run(main)
