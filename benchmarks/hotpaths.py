"""The two per-push paths of the data path, timed in one process, without sockets or pipes' waits.

End-to-end A/Bs on this VM scatter by ±15% per round, more than a cut of a few microseconds per
push can show; these time the code alone, median of thousands of runs:

- ``front``: what the server's main process does with a worker's answer of ``K`` images, up to the
  reply's bytes: the metrics, the registry's record, the Session's take, completions, reply
  (``outcome_to_proto``), serialization, ack and release. The answer is handed over as the pool
  does, in one burst.
- ``worker``: a stage worker's ``handle_group`` of one chunk of ``K`` images with the null
  pipeline: the read (through ``/proc/<pid>/fd``), the header checks, the outcomes, the pickled
  answer written to a pipe (drained by a thread).
- ``client``: the client library's rewrite of its batch file (``BatchFiles.write``) with ``K``
  scenes, two compositions alternating as the load clients' batches do (``images[(n + k) % 16]``),
  so the file shrinks and grows by turns.

    .venv/bin/python -m benchmarks.hotpaths --images 8
    PYTHONPATH=<other tree>/src .venv/bin/python -m benchmarks.hotpaths   # another revision's code
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import servers
from infer_client._batch_files import BatchFiles
from infer_proto import infer_pb2
from infer_server.front.batches import BatchRegistry
from infer_server.front.handoff import BatchFile
from infer_server.front.metrics import ServerMetrics
from infer_server.front.session import MAX_RESULTS_PER_REPLY, outcome_to_proto
from infer_server.messages import FileRef, ImageOutcome, ImageRef, WorkItem
from infer_server.settings import ServerSettings
from infer_server.stage.pipeline import NullPipeline
from infer_server.stage.worker import ChunkReader, StageWorker


def _median_us(run: Callable[[], float], runs: int) -> float:
    for _ in range(min(300, runs)):  # warm: allocator, caches
        run()
    return statistics.median(run() for _ in range(runs)) * 1e6


def _answer(metrics: ServerMetrics, registry: BatchRegistry, outcomes: list[ImageOutcome]) -> None:
    """As ``InferenceServer._on_outcomes``. (Revisions before 8fb6046 counted and recorded one image
    per call: ``image_done``, ``record(outcome)``.)"""
    if hasattr(metrics, "images_done"):
        metrics.images_done(outcomes)
        registry.record(*outcomes)
    else:
        for outcome in outcomes:
            metrics.image_done(outcome)  # type: ignore[attr-defined]
            registry.record(outcome)


async def _front(images: int, runs: int) -> float:
    registry = BatchRegistry(max_inflight_images=10_000, max_inflight_bytes=10**9, result_ttl_s=60.0)
    metrics, cursor = ServerMetrics(lambda: 0), registry.open_session()
    refs = tuple(ImageRef(i, 10 * i, 10, "") for i in range(images))
    timings = (("read", 0.06), ("queue", 0.45))  # what the null pipeline reports

    def one() -> float:
        reservation = registry.reserve("", refs, 10 * images, deadline=1e12)
        registry.activate(reservation, BatchFile(FileRef("/dev/shm/b", 1, 2, 10 * images, -1), refs, staged=False))
        batch = reservation.batch
        cursor.add(batch, wake=False)
        outcomes = [ImageOutcome(batch.batch_id, i, "", width=640, height=480, timings_ms=timings, worker=1,
                                 batch_images=images) for i in range(images)]  # fmt: skip
        start = time.perf_counter()
        _answer(metrics, registry, outcomes)
        taken = cursor.take(MAX_RESULTS_PER_REPLY)
        completed = cursor.completions(taken)
        reply = infer_pb2.SessionReply(completed=completed)
        for outcome in taken:
            outcome_to_proto(outcome, reply.results.add)
        reply.SerializeToString()
        cursor.ack(taken)
        cursor.release(completed)
        return time.perf_counter() - start

    return _median_us(one, runs)


@contextlib.contextmanager
def null_worker(images: int) -> Iterator[Callable[[], None]]:
    """A null-model ``StageWorker`` in this process and a function that hands it one chunk of
    ``images`` scenes (a tmpfs batch file, read through this process's descriptor); its answers
    go down a pipe that a thread drains."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        blobs = [Path(p).read_bytes() for p in servers.scene_files(Path(tmp))]
        blobs = (blobs * (images // len(blobs) + 1))[:images]
        path = Path(tmp) / "batch"
        path.write_bytes(b"".join(blobs))
        offsets = [sum(len(b) for b in blobs[:i]) for i in range(images)]
        refs = tuple(ImageRef(i, offset, len(b), "") for i, (offset, b) in enumerate(zip(offsets, blobs, strict=True)))
        fd = os.open(path, os.O_RDONLY)
        st = os.fstat(fd)
        file = FileRef(str(path), st.st_dev, st.st_ino, st.st_size, fd)
        answers, results = multiprocessing.Pipe(duplex=False)
        drain = threading.Thread(target=_drain, args=(answers,), daemon=True)
        drain.start()
        options = ServerSettings(null_model=True, batch_size=max(8, images)).worker_options()
        worker = StageWorker(1, NullPipeline(options, 1), results, reader=ChunkReader(owner=os.getpid()))
        ids = iter(range(1, 1 << 62))

        def chunk() -> None:
            item = WorkItem(next(ids), "a" * 32, file, refs, time.monotonic() + 60, submitted=time.monotonic())
            worker.handle_group([item])

        try:
            yield chunk
        finally:
            results.close()
            drain.join(5)
            os.close(fd)


def _worker(images: int, runs: int) -> float:
    with null_worker(images) as chunk:

        def one() -> float:
            start = time.perf_counter()
            chunk()
            return time.perf_counter() - start

        return _median_us(one, runs)


def _client(images: int, runs: int) -> float:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        scenes = [Path(p).read_bytes() for p in servers.scene_files(Path(tmp))]
        batches = [[scenes[(n + k) % len(scenes)] for k in range(images)] for n in (0, images)]
        files = BatchFiles(tmp, keep=1)

        def one() -> float:  # a shrink and a growth: half of it per batch
            start = time.perf_counter()
            for batch in batches:
                path, _ = files.write(batch)
                files.recycle(path)
            return (time.perf_counter() - start) / 2

        try:
            return _median_us(one, runs)
        finally:
            files.remove_all()


def _drain(conn: Any) -> None:
    while True:
        try:
            conn.recv_bytes()
        except (EOFError, OSError):
            return


def main(
    images: Annotated[int, typer.Option(help="Images per push (K).")] = 8,
    runs: Annotated[int, typer.Option(help="Timed runs of each path.")] = 3000,
) -> None:
    """Median time of each path for one push of ``images`` images, and per image."""
    front = asyncio.run(_front(images, runs))
    worker = _worker(images, runs)
    client = _client(images, runs)
    for name, us in (("front: a worker's answer to the reply's bytes", front), ("worker: one chunk", worker),
                     ("client: its batch file rewritten, two sizes by turns", client)):  # fmt: skip
        print(f"{name}: {us:.1f} µs per push of {images}, {us / images:.2f} µs per image")


if __name__ == "__main__":
    typer.run(main)
