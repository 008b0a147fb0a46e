"""The instructions a null-model stage worker executes per chunk, counted by callgrind.

``benchmarks.instructions`` counts the main process's; this counts a worker's ``handle_group`` of
one chunk of ``images`` scenes in a tmpfs batch file, as the pool hands it over: the read through
the owner's descriptor, the header checks, the outcomes, the answer written to a pipe (a thread
drains it, counted too). The loop runs under ``valgrind --tool=callgrind`` twice, ``short`` and
``long`` chunks, and the difference over ``long - short`` chunks is the count per chunk, start-up
and warm-up cancelled out. The same revision counts the same within about 1%, so two revisions
compare by running this in each tree::

    .venv/bin/python -m benchmarks.worker_instructions --images 8
    PYTHONPATH=<other tree>/src .venv/bin/python -m benchmarks.worker_instructions   # another revision

Needs valgrind (Debian's ``valgrind`` package).
"""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

import typer

from benchmarks import hotpaths, servers


def _loop(images: int, chunks: int) -> None:
    """``chunks`` chunks of ``images`` images through one worker, in this process."""
    from infer_server.messages import FileRef, ImageRef, WorkItem
    from infer_server.settings import ServerSettings
    from infer_server.stage.pipeline import NullPipeline
    from infer_server.stage.worker import ChunkReader, StageWorker

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        blobs = [Path(p).read_bytes() for p in servers.scene_files(Path(tmp))]
        blobs = (blobs * (images // len(blobs) + 1))[:images]
        path = Path(tmp) / "batch"
        path.write_bytes(b"".join(blobs))
        offsets = [sum(len(b) for b in blobs[:i]) for i in range(images)]
        refs = tuple(ImageRef(i, o, len(b), "") for i, (o, b) in enumerate(zip(offsets, blobs, strict=True)))
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        file = FileRef(str(path), st.st_dev, st.st_ino, st.st_size, fd)
        answers, results = multiprocessing.Pipe(duplex=False)
        drain = threading.Thread(target=hotpaths._drain, args=(answers,), daemon=True)
        drain.start()
        options = ServerSettings(null_model=True, batch_size=max(8, images)).worker_options()
        worker = StageWorker(1, NullPipeline(options, 1), results, reader=ChunkReader(owner=os.getpid()))
        for n in range(chunks):
            item = WorkItem(n + 1, "a" * 32, file, refs, time.monotonic() + 60, submitted=time.monotonic())
            worker.handle_group([item])
        results.close()
        drain.join(5)
        os.close(fd)


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
