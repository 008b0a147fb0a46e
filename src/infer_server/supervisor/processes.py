"""The worker processes a ``PipelinePool`` owns: what each one runs, what the pool knows of it, and
how they are ended. Runs in the server process; the stage code itself is imported only in the
children (``worker_main``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.connection
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from infer_server.messages import FAILED_EXIT, RETIRED_EXIT, STOP, WorkerReady
from infer_server.supervisor.channels import Inbox
from infer_server.supervisor.ledger import CRASHED, PIPELINE_FAILED, Chunk

log = logging.getLogger("infer_server.supervisor.pool")

MAX_WAIT = 5.0  # upper bound of every internal wait of the supervisor; events normally end them sooner


def worker_main(*args: Any) -> None:
    """A worker process's target: the stage code is imported in the child only, never in the server."""
    from infer_server.stage.worker import run_worker

    run_worker(*args)


@dataclass(eq=False)
class WorkerProcess:
    """One worker process (a slot gets a new one after each death)."""

    slot: int
    process: Any
    inbox: Inbox
    results: multiprocessing.connection.Connection
    current: Any  # shared ctypes value: id of the chunk the worker took last
    ready: bool = False
    setup_error: str | None = None
    held: dict[int, Chunk] = field(default_factory=dict)  # chunks handed to it, by item id
    drained: threading.Event = field(default_factory=threading.Event)  # its pipe reached EOF
    running: tuple[int, float] = (0, 0.0)  # the chunk it is on, and since when (as the watcher saw it)
    overran: bool = False  # stopped by the watcher: a chunk ran past max_chunk_seconds
    options: Any = None  # the WorkerOptions it was spawned with
    report: WorkerReady | None = None  # what it loaded and saw, once READY
    retiring: bool = False  # takes no more chunks and stops after those it holds (a model change)
    held_images: int = 0  # the images of the chunks in ``held`` (``hold`` and ``release`` keep it)

    @property
    def models(self) -> tuple[tuple[str, str], ...]:
        return self.report.models if self.report is not None else ()

    def hold(self, chunk: Chunk) -> None:
        """``chunk`` was handed to this worker."""
        self.held[chunk.item.item_id] = chunk
        self.held_images += len(chunk.item.images)

    def release(self, item_id: int) -> Chunk | None:
        """The chunk ``item_id`` was answered: no longer held (None if it was not)."""
        chunk = self.held.pop(item_id, None)
        if chunk is not None:
            self.held_images -= len(chunk.item.images)
        return chunk

    def has_credit(self, batch_size: int, images: int) -> bool:
        """It takes a chunk of ``images`` images: a READY worker taking chunks, holding fewer chunks
        than its inbox takes, and two batches of images at most with it (one running, the next
        waiting; with dynamic batching, small chunks waiting together make that next batch)."""
        return (self.ready and not self.retiring and len(self.held) < self.inbox.items
                and (not self.held or self.held_images + images <= 2 * batch_size))  # fmt: skip


def report_death(worker: WorkerProcess, max_chunk_s: float) -> str:
    """Log why ``worker`` ended and mark the chunks it was on as started; the reason their unanswered
    images get if they run out of attempts."""
    pid, code = worker.process.pid, worker.process.exitcode
    if worker.retiring:
        log.info("worker %d (pid %s) stopped for a model change", worker.slot, pid)
    elif code == RETIRED_EXIT:
        log.info("worker %d (pid %s) retired to give its memory back; replacing it", worker.slot, pid)
    else:
        log.warning("worker %d (pid %s) died: %s", worker.slot, pid, worker.setup_error or f"exit code {code}")
    # It takes chunks in the order they were sent (``held``'s), the last it took in ``current``:
    # that one and every one before it that is still open may have run.
    taken = worker.current.value in worker.held
    for item_id, chunk in worker.held.items():
        chunk.started = taken
        taken = taken and item_id != worker.current.value
    if worker.overran:
        return f"took longer than {max_chunk_s:.0f} s to process"
    return PIPELINE_FAILED if code == FAILED_EXIT else CRASHED


def overrunning(slots: list[WorkerProcess | None], now: float, max_chunk_s: float) -> list[WorkerProcess]:
    """The workers on one chunk for longer than ``max_chunk_s`` (each marked ``overran`` and logged
    once); called by the pool's watcher under the pool's lock, every pass."""
    victims = []
    for w in slots:
        if w is None or not w.ready or w.overran or w.current.value not in w.held:
            continue
        if w.running[0] != w.current.value:
            w.running = (w.current.value, now)
        elif now - w.running[1] > max_chunk_s:
            w.overran = True
            victims.append(w)
            log.warning("worker %d (pid %s) has been on chunk %d for over %.0f s: replacing it",
                        w.slot, w.process.pid, w.running[0], max_chunk_s)  # fmt: skip
    return victims


def end_processes(workers: list[WorkerProcess], deadline: float) -> None:
    """Stop marker → join until ``deadline`` → terminate → kill; then wait (bounded) until the loop
    has read what each worker sent before it exited, so none of it is lost."""
    for w in workers:
        with contextlib.suppress(OSError):  # a dead worker; the stop event alone stops a busy one
            w.inbox.put(STOP)
    for w in workers:
        w.process.join(max(0.5, deadline - time.monotonic()))
    for w in workers:
        for end in (w.process.terminate, w.process.kill):
            if w.process.is_alive():
                end()
                w.process.join(2.0)
    for w in workers:
        w.drained.wait(min(MAX_WAIT, max(0.5, deadline - time.monotonic())))


def stop_reading(loop: asyncio.AbstractEventLoop, conns: list[Any]) -> None:
    """Unregister the result pipes ``conns`` from the loop before they are closed (their numbers
    get reused); from a thread other than the loop's."""
    done = threading.Event()

    def remove() -> None:
        for conn in conns:
            if not conn.closed:
                loop.remove_reader(conn.fileno())
        done.set()

    try:
        loop.call_soon_threadsafe(remove)
    except RuntimeError:  # the loop is closed, and with it every registration
        return
    done.wait(MAX_WAIT)
