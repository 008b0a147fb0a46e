"""The supervisor of the stage workers; runs in the server process, driven by the gRPC front.

Processes. ``PipelinePool`` spawns ``workers`` children (spawn context: grpc is not fork-safe), each
running ``infer_server.stage.worker.run_worker``: it loads the models, says ``WorkerReady`` (or
``WorkerFailed``) and then serves ``WorkItem``s. ``start()`` returns only when every worker is READY
and raises ``PipelineError`` with a worker's own message otherwise.

Pipes and messages (``infer_server.messages``). ``submit_batch`` cuts a batch into chunks of at
most ``batch_size`` images; chunks wait in the pool (their number is bounded by the front's
admission control) and are handed to workers on credit: each worker has its own inbox, a pipe the
pool writes into directly and without ever blocking (``channels.Inbox``; what one turn of the loop
hands a worker goes in one write: ``channels.WriteCoalescer``), and holds two batches of images at
most (one running, one waiting) in ``CREDIT`` chunks at most (``GATHER_CREDIT`` with dynamic
batching, ``stage.gather``), so the pool knows which chunks each worker holds. A worker writes the
id of the last chunk it takes into its shared ``current`` value and answers through its own result
pipe with one ``ItemDone`` per chunk, carrying every image's outcome (a tuple of them per group of
chunks it ran together). A pipe per worker, not one shared queue: a worker SIGKILLed while writing
to a shared ``multiprocessing.Queue`` would leave its lock held (and a half-written message) for
every other worker; a private pipe just reaches EOF and is discarded.

Threads, and the loop. The server's asyncio loop reads every result pipe (``add_reader``), records
which images are answered and calls ``on_outcomes`` with them — exactly once per submitted image:
an outcome for an image already answered (a dead worker's late result, a retry's second answer) is
dropped. ``on_outcomes`` and ``on_health`` always run on that loop: outcomes the pool makes up in its own
threads (deadline, crash, shutdown) are handed over in bursts, one wake-up of the loop per burst.
``start`` and ``stop`` wait for the workers, whose messages only the loop can read, so they must be
called off the loop (the front runs them in an executor thread). One *watcher* thread waits on the
process sentinels, so a death is seen at once without polling, and starts due restarts.

Death. When a worker dies the watcher waits until the loop has drained its pipe to EOF (so every
outcome it managed to send counts), reports ``on_health(False)``, and hands its chunks back to the
ledger (``supervisor.ledger``): the chunks it had taken (up to its ``current`` value; chunks go to a
worker in order and it takes them in that order) count as started, and its images come back as
single-image chunks with ``attempt + 1`` (a poison image can only take itself down), or are answered
UNAVAILABLE once ``max_attempts`` is spent; chunks it had not started go back unchanged. A
replacement is spawned (with backoff when setup keeps failing) and ``on_health(True)`` follows once
every slot is READY again. Chunks whose deadline passes while waiting are answered by the pool.

Models. Restarts load the versions that served at start (then pinned), not what lands on disk later;
``reload(options)`` changes them (``supervisor.rollout``); a batch's ``route`` picks the pipeline.

Stop. ``stop(drain=True)`` waits (bounded) until submitted work is answered, then stop event +
stop marker → ``join(timeout)`` → ``terminate`` → ``kill``; images still open get UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import operator
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from infer_server.messages import (
    ROUTE_STABLE,
    Code,
    FileRef,
    ImageOutcome,
    ImageRef,
    ShadowDone,
    WorkerFailed,
    WorkerOptions,
    WorkerReady,
)
from infer_server.supervisor.channels import Inbox, LoopHandoff, ResultReader, Wakeup, WriteCoalescer
from infer_server.supervisor.ledger import ChunkLedger
from infer_server.supervisor.processes import (
    MAX_WAIT,
    WorkerProcess,
    end_processes,
    overrunning,
    report_death,
    stop_reading,
    worker_main,
)
from infer_server.supervisor.rollout import roll

log = logging.getLogger(__name__)

CREDIT, GATHER_CREDIT = 2, 16  # chunks a worker may hold; with dynamic batching, small ones waiting make a batch
_HELD_IMAGES = operator.attrgetter("held_images")  # dispatch's key: the least loaded worker


class PipelineError(RuntimeError):
    """The pipeline cannot take work: a worker failed to start, or the pool is stopped."""


class PipelinePool:
    """The stage workers of one server. ``on_outcomes`` and ``on_health`` run on ``loop``."""

    def __init__(
        self, repo_dir: Path, options: WorkerOptions, *, workers: int, max_attempts: int,
        max_chunk_seconds: float = 60.0, loop: asyncio.AbstractEventLoop,
        on_outcomes: Callable[[list[ImageOutcome]], None],
        on_health: Callable[[bool], None] | None = None, on_shadow: Callable[[ShadowDone], None] | None = None,
    ) -> None:  # fmt: skip
        if workers < 1 or options.batch_size < 1 or max_attempts < 1:
            raise ValueError("workers, batch_size and max_attempts must be at least 1")
        self._credit = Inbox.credit(options.batch_size, GATHER_CREDIT if options.dynamic_batching else CREDIT, CREDIT)
        self.repo_dir, self.num_workers = Path(repo_dir), workers
        self._options = options
        self._max_chunk_s = max_chunk_seconds
        self._on_health, self._on_shadow = on_health, on_shadow
        self._loop = loop
        self._to_loop = LoopHandoff(loop, on_outcomes)
        self._coalescer = WriteCoalescer(self._to_loop)
        self._ctx = multiprocessing.get_context("spawn")
        self._stop_event = self._ctx.Event()
        self._halted = False  # the stop event was set (read on every dispatch)
        self._cond = threading.Condition()  # guards everything below and the ledger
        self._ledger = ChunkLedger(options.batch_size, max_attempts)
        self._slots: list[WorkerProcess | None] = [None] * workers
        self._restart_at: dict[int, float] = {}
        self._setup_failures: collections.Counter[int] = collections.Counter()
        self._started = self._stopping = self._closed = False
        self.models: tuple[tuple[str, str], ...] = ()  # (name, version) of what the workers loaded
        self.report = WorkerReady(-1, 0)  # their report: the repository's catalog, the candidate, the profile
        self.reload_lock = threading.Lock()  # one model change at a time (``supervisor.rollout``)
        self.standing_in: set[int] = set()  # extra slots restarted like any other (during a change)
        self._start_failure: str | None = None
        self._health_reported: bool | None = None
        self._watch_wakeup = Wakeup()
        self._watcher = threading.Thread(target=self._watch_workers, name="pool-watcher", daemon=True)

    # ----------------------------------------------------------------------------------- public
    def start(self, timeout: float = 120.0) -> None:
        """Spawn every worker, block until all are READY; raise ``PipelineError`` otherwise."""
        self._not_on_loop("start")
        with self._cond:
            if self._started or self._stopping:
                raise PipelineError("the pool was already started")
        self._watcher.start()
        for slot in range(self.num_workers):
            self._spawn(slot)
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._all_ready() and self._start_failure is None and time.monotonic() < deadline:
                self._cond.wait(min(MAX_WAIT, deadline - time.monotonic()))
            failure = self._start_failure
            if failure is None and not self._all_ready():
                failure = f"workers were not ready after {timeout:.0f}s"
            self._started = failure is None
            pins = {**dict(self.models), **dict(self._options.pins)}  # what serves now, not what lands later
            self._options = dataclasses.replace(self._options, pins=tuple(sorted(pins.items())))
        if failure is not None:
            self.stop(timeout=5.0, drain=False)
            raise PipelineError(failure)
        self._report_health()

    def submit_batch(
        self, batch_id: str, file: FileRef, images: Sequence[ImageRef], deadline: float, route: int = ROUTE_STABLE
    ) -> None:
        """Queue a batch's images in chunks of ``batch_size`` (``route``: see ``WorkItem``); never blocks."""
        with self._cond:
            if not self._started or self._stopping:
                raise PipelineError("the pipeline is not running")
            self._ledger.add_batch(batch_id, file, images, deadline, time.monotonic(), route)
            self._dispatch()

    def refile(self, batch_id: str, file: FileRef | None) -> bool:
        """Workers are to read ``batch_id``'s images from ``file`` (a copy elsewhere; None: only ask)
        from now on: True if no chunk of it had been handed out yet, else False and nothing changed."""
        with self._cond:
            return self._ledger.refile(batch_id, file)

    def reload(self, options: WorkerOptions, timeout: float = 120.0) -> tuple[tuple[str, str], ...]:
        """Move every worker to ``options`` without losing or failing an image (``supervisor.rollout``;
        blocking: off the loop); the models now served. ``ReloadRefused``: nothing changed."""
        self._not_on_loop("reload")
        return roll(self, options, timeout)

    @property
    def options(self) -> WorkerOptions:
        """What the workers are (or, during a model change, are being) started with."""
        return self._options

    @property
    def healthy(self) -> bool:
        """Every worker slot has a live, READY worker (and the pool is running)."""
        with self._cond:
            return self._started and not self._stopping and self._all_ready()

    def stop(self, timeout: float = 10.0, drain: bool = True) -> None:
        """Drain (bounded by ``timeout``) if asked, then stop every worker; no child survives."""
        self._not_on_loop("stop")
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._stopping = True
            while drain and self._ledger.open_images and time.monotonic() < deadline:
                self._cond.wait(min(MAX_WAIT, deadline - time.monotonic()))
            self._halted = True
            self._stop_event.set()  # jumps the queue: a worker checks it before each chunk
            workers = [w for w in self._slots if w is not None]
        end_processes(workers, deadline)
        with self._cond:
            self._closed = True
            leftover = self._ledger.fail_all(Code.UNAVAILABLE, "server is shutting down")
        self._deliver(leftover)
        self._watch_wakeup.set()
        if self._watcher.is_alive() and self._watcher is not threading.current_thread():
            self._watcher.join(MAX_WAIT)
        stop_reading(self._loop, [w.results for w in workers])
        for w in workers:
            w.inbox.close()
            w.results.close()  # the loop no longer reads them; it closed those it saw end already
        self._watch_wakeup.close()
        self._report_health()

    # ------------------------------------------------------------------------------- internals
    def _all_ready(self) -> bool:
        """As many READY workers taking chunks as slots (in a model change, the extra one stands in)."""
        return sum(w is not None and w.ready and not w.retiring for w in self._slots) >= self.num_workers

    def _dispatch(self) -> None:
        """Hand pending chunks to READY workers with free credit, least loaded first (locked)."""
        while self._ledger.pending and not self._halted:  # the stop event's own check takes a lock
            size = len(self._ledger.pending[0].item.images)
            free = [w for w in self._slots if w is not None and w.has_credit(self._ledger.batch_size, size)]
            if not free:
                return
            worker = min(free, key=_HELD_IMAGES)
            chunk = self._ledger.pending.popleft()
            worker.hold(chunk)
            try:
                chunk.nameless = worker.inbox.put(chunk.item)  # never blocks; on the loop, goes at its turn's end
            except OSError:  # the worker died: the watcher hands its chunks back, this one too
                log.debug("worker %d is gone; chunk %d waits for its replacement", worker.slot, chunk.item.item_id)

    def _deliver(self, outcomes: Sequence[ImageOutcome | None]) -> None:
        """Hand answered images to ``on_outcomes`` on the loop (outside the lock: it may call back)."""
        if outcomes:
            with self._cond:
                self._cond.notify_all()  # stop(drain=True) waits for the ledger to empty
        answered = [o for o in outcomes if o is not None]
        if answered:
            self._to_loop.outcomes(answered)

    def _report_health(self) -> None:
        with self._cond:
            healthy = self._started and not self._stopping and self._all_ready()
            changed = healthy != self._health_reported and (self._health_reported is not None or healthy)
            self._health_reported = healthy
        if changed and self._on_health is not None:
            self._to_loop.call(self._on_health, healthy)

    def _not_on_loop(self, what: str) -> None:
        if self._to_loop.on_loop():
            raise PipelineError(f"{what}() waits for the workers, whose pipes the loop reads: call it off the loop")

    def _read(self, worker: WorkerProcess, conn: Any) -> None:
        """On the loop: read ``conn`` whenever it has data (``_drain`` unregisters it at EOF)."""
        if not conn.closed:
            self._loop.add_reader(conn.fileno(), self._drain, worker, ResultReader(conn))

    def _drain(self, worker: WorkerProcess, reader: ResultReader) -> None:
        """Handle every message ``reader``'s pipe holds now (a chunk's outcomes arrive back to back:
        they are taken in one read). Runs on the loop."""
        conn = reader.conn
        if conn.closed:  # stop() closed it after this call was queued
            return
        messages, ended = reader.read()
        for message in messages:
            try:
                self._handle(worker, message)
            except Exception:  # a bug here must not silence every worker
                log.exception("could not handle %r from worker %d", message, worker.slot)
        if ended:  # EOF, or a message garbled by the worker's death
            self._loop.remove_reader(conn.fileno())
            conn.close()
            worker.drained.set()

    def _handle(self, worker: WorkerProcess, message: Any) -> None:
        deliveries: list[ImageOutcome | None] = []
        shadow: ShadowDone | None = None
        with self._cond:
            if isinstance(message, tuple):  # the ItemDone of each chunk a worker ran together
                for done in message:
                    deliveries += self._ledger.answered(worker.release(done.item_id), done)
                self._dispatch()
            elif isinstance(message, WorkerReady):
                worker.ready, worker.report = True, message
                if worker.options == self._options:  # not a candidate of a model change (yet)
                    self.models, self.report = message.models, message
                self._setup_failures[worker.slot] = 0
                log.info("worker %d (pid %d) is ready", worker.slot, message.pid)
                self._dispatch()
                self._cond.notify_all()
            elif isinstance(message, WorkerFailed):
                worker.setup_error = f"worker {worker.slot} failed to start: {message.message}"
                if not self._started:
                    self._start_failure = self._start_failure or worker.setup_error
                self._cond.notify_all()
            elif isinstance(message, ShadowDone) and self._on_shadow is not None:
                shadow = message
        self._deliver(deliveries)
        if shadow is not None and self._on_shadow is not None:
            self._on_shadow(shadow)
        if isinstance(message, WorkerReady):
            self._report_health()

    def _watch_workers(self) -> None:
        """Watcher thread: worker deaths (process sentinels), due restarts, expired pending chunks."""
        while not self._closed:
            with self._cond:
                alive = {w.process.sentinel: w for w in self._slots if w is not None}
                now = time.monotonic()
                due = [slot for slot, at in self._restart_at.items() if at <= now]
                for slot in due:
                    del self._restart_at[slot]
                wait = min([MAX_WAIT, self._max_chunk_s / 4, *(at - now for at in self._restart_at.values())])
            for slot in due:
                self._spawn(slot)
            if due:
                continue
            for ready in multiprocessing.connection.wait([*alive, self._watch_wakeup.reader], max(0.0, wait)):
                if ready is self._watch_wakeup.reader:
                    self._watch_wakeup.clear()
                else:
                    self._on_death(alive[ready])
            with self._cond:
                expired = self._ledger.expire(time.monotonic())
            self._deliver(expired)
            self._stop_overrunning(time.monotonic())

    def _stop_overrunning(self, now: float) -> None:
        """Kill a worker that has been on one chunk for longer than ``max_chunk_seconds`` (a hostile
        or pathological image): its death hands the chunk back like any other death."""
        with self._cond:
            victims = overrunning(self._slots, now, self._max_chunk_s)
        for w in victims:
            with contextlib.suppress(OSError):
                w.process.kill()

    def _spawn(self, slot: int, options: WorkerOptions | None = None) -> WorkerProcess | None:
        """Start a worker in ``slot`` (-1: an extra one, ``supervisor.rollout``) with ``options`` (or the pool's)."""
        with self._cond:  # under the lock, so stop() cannot miss a worker started concurrently
            if self._stop_event.is_set() or self.num_workers <= slot not in self.standing_in:
                return None  # stopping, or the restart of an extra slot that was stood down since
            options, slot = options or self._options, len(self._slots) if slot < 0 else slot
            child_inbox, inbox = self._ctx.Pipe(duplex=False)
            results, child_end = self._ctx.Pipe(duplex=False)
            current = self._ctx.RawValue("q", 0)
            args = (slot, str(self.repo_dir), options, child_inbox, child_end, self._stop_event, current)
            process = self._ctx.Process(target=worker_main, name=f"infer-worker-{slot}", args=args, daemon=True)
            process.start()
            child_end.close()  # the worker holds the only write end: its death is EOF here
            child_inbox.close()
            to_worker = Inbox(inbox, self._ledger.batch_size, self._credit, least=CREDIT,  # this pipe's own credit
                              hold=self._coalescer.hold)  # fmt: skip
            worker = WorkerProcess(slot, process, to_worker, results, current, options=options)
            if slot == len(self._slots):
                self._slots.append(worker)
            else:
                self._slots[slot] = worker
        self._to_loop.call(self._read, worker, results)
        self._watch_wakeup.set()
        return worker

    def _on_death(self, worker: WorkerProcess) -> None:
        worker.process.join(1.0)
        if self._stop_event.is_set():
            return  # stop() reaps the workers and answers what is left
        worker.drained.wait(MAX_WAIT)  # count every outcome it sent before dying
        with self._cond:
            if worker.slot >= len(self._slots) or self._slots[worker.slot] is not worker:
                return
            self._slots[worker.slot] = None
            self._cond.notify_all()  # a model change waits for slots to empty and refill
            extra = worker.slot >= self.num_workers and worker.slot not in self.standing_in  # not restarted
            while len(self._slots) > self.num_workers and self._slots[-1] is None:
                self._slots.pop()
            if not self._started:
                code = worker.process.exitcode
                self._start_failure = self._start_failure or worker.setup_error or (
                    f"worker {worker.slot} exited with code {code} during setup")  # fmt: skip
                self._cond.notify_all()
                return
            reason = report_death(worker, self._max_chunk_s)
            held = reversed(worker.held.values())  # last first: each goes to the head of the line, in order
            deliveries = [o for chunk in held for o in self._ledger.requeue(chunk, reason)]
            worker.inbox.close()  # its result pipe is the reader's to close
            if worker.setup_error:  # a crash loop must not spin: back off 1, 3, 7 … 30 s
                self._setup_failures[worker.slot] += 1
            backoff = min(30.0, 2.0 ** self._setup_failures[worker.slot] - 1)
            if not extra:
                self._restart_at[worker.slot] = time.monotonic() + backoff
            self._dispatch()
        self._report_health()
        self._deliver(deliveries)
