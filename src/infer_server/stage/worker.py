"""Stage worker: the child process that runs the vision pipeline on the chunks the pool hands it.

Started by ``infer_server.supervisor.pool.PipelinePool`` with the spawn context (grpc is not fork-safe), one
process per worker slot; ``run_worker`` is the process target. Protocol, all records from
``infer_server.messages``:

* setup: load the model repository, the engines and the DALI pipelines, run one warm-up pass, then
  send ``WorkerReady`` — or ``WorkerFailed(message)`` and exit. With ``null_model`` the worker loads
  nothing and runs ``NullPipeline`` (read + header check only) to measure the data path alone.
* per group of ``WorkItem``s from the worker's own inbox (one chunk, or with dynamic batching the
  chunks waiting together that fit in one batch: ``stage.gather``): the last one's id goes into
  the shared ``current`` value (what the pool reads if this worker dies), the pipeline runs once on
  all their images, then one ``ItemDone`` per chunk carries an ``ImageOutcome`` per image, the
  group's in one message (a tuple: one write and one wake-up of the pool per group). Work
  dequeued after its deadline is answered DEADLINE_EXCEEDED without running. A failure of the
  pipeline itself (not of an image: those are per-image outcomes) answers the chunks INTERNAL,
  unless it left the pipeline unusable (an allocation failed): then the worker exits with
  ``FAILED_EXIT`` without answering, and the pool retries the images one per chunk.
* ``STOP`` in the inbox, or the shared stop event, ends the loop; the worker also exits when its
  parent dies (a thread waits on the parent's sentinel), so no orphan outlives the server.
* memory: the decoder keeps the buffers a huge image grew, for good (``docs/security.md`` has the
  figures), so a worker whose resident memory passes ``memory_mib`` after answering a chunk exits
  with ``RETIRED_EXIT`` and the pool starts a fresh one. On cpu the data segment is also capped
  (``RLIMIT_DATA``: what loading the models took plus twice that bound): a chunk that would need
  more fails, leaving the pipeline unusable, so the worker exits with ``FAILED_EXIT`` and the pool
  retries the images one by one; only an image that alone needs more fails. A bound the worker is
  over as soon as its models are loaded is a setup error.

Results go through the worker's own pipe (``results``), never a queue shared with other workers: a
worker killed mid-write can then only corrupt its own channel, which the pool discards with it.

Each image's bytes are read once, through the front's own descriptor of the batch file, into
private memory (``stage.reader.ChunkReader``: one buffer, reused by every chunk), and every check
runs on that copy.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing.connection  # also binds multiprocessing
import os
import resource
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from infer_server import heap
from infer_server.messages import (
    FAILED_EXIT,
    RETIRED_EXIT,
    ROUTE_CANARY,
    ROUTE_SHADOW,
    Code,
    ImageOutcome,
    ImageRef,
    ItemDone,
    ShadowDone,
    WorkerFailed,
    WorkerOptions,
    WorkerReady,
    WorkItem,
    replaced,
    send,
)
from infer_server.stage.gather import Gatherer, Group
from infer_server.stage.reader import ChunkReader
from infer_server.stage.shadow import Budget, compare

if TYPE_CHECKING:
    from multiprocessing.connection import Connection
    from multiprocessing.synchronize import Event

    from infer_server.stage.pipeline import NullPipeline, VisionPipeline

log = logging.getLogger(__name__)

_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS")  # fmt: skip


def limit_threads(threads: int) -> None:
    """N workers on N cores: every library in this process gets ``threads`` threads, not one per core.

    Must run before NumPy, OpenCV, ONNX Runtime or DALI are imported, which is why this module
    imports the pipeline only inside ``run_worker``.
    """
    for var in _THREAD_VARS:
        os.environ[var] = str(threads)


def pin_cpus(worker_id: int, cpus: tuple[int, ...], threads: int) -> set[int]:
    """Worker ``worker_id``'s share of ``cpus``: ``threads`` of them, in turn (worker 0 the first), round and round."""
    return {cpus[(worker_id * threads + k) % len(cpus)] for k in range(threads)}


def _pin(worker_id: int, options: WorkerOptions) -> None:
    """``--pin-workers``: this process on its share of ``options.cpus``, first thing, so that every
    thread a library starts later (the decoder's, the engines') stays there too."""
    if not options.cpus:
        return
    share = pin_cpus(worker_id, options.cpus, options.intra_op_threads)
    try:
        os.sched_setaffinity(0, share)
    except OSError as exc:  # the server's CPU set shrank since it started: run unpinned, say so
        log.warning("worker %d: cannot pin to CPUs %s (%s): running unpinned", worker_id, sorted(share), exc)
        return
    log.info("worker %d: pinned to CPUs %s", worker_id, sorted(share))


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)  # the supervisor is gone: nobody can take our results

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class StageWorker:
    """The loop of one worker process: take a chunk, answer every image of it in one message."""

    def __init__(
        self, worker_id: int, pipeline: VisionPipeline | NullPipeline, results: Connection, current: Any = None,
        reader: ChunkReader | None = None, memory_mib: int | None = None, digests: bool = False,
    ) -> None:  # fmt: skip
        self.worker_id, self.pipeline, self.results = worker_id, pipeline, results
        self.current = current  # shared ctypes value: id of the item taken last (None: not shared)
        self.reader = reader or ChunkReader()
        self.memory_mib = memory_mib
        self.digests = digests
        self.candidate: VisionPipeline | None = None  # the version under trial (canary, shadow)
        self.budget = Budget(0.1)
        self.gathering: tuple[int, float] | None = None  # (batch size, max queue delay s): run waiting chunks together

    def serve(self, inbox: Connection, stop: Event) -> int | None:
        """Serve chunks until stopped (None), or until this worker must go: ``RETIRED_EXIT`` (too
        much memory resident) or ``FAILED_EXIT`` (the pipeline failed; its chunks are not answered).
        With ``gathering`` (batch size, maximum queue delay) set, chunks waiting together run as
        one batch (``stage.gather``)."""
        size, delay = self.gathering or (1, 0.0)
        gatherer = Gatherer(inbox, size, delay, enabled=self.gathering is not None)
        while not stop.is_set():
            # Blocking is the idle state of a worker: the stop marker, the parent's death (see
            # _exit_with_parent) and the pool's terminate → kill after join(timeout) all end it.
            items = gatherer.next_group()
            if not items or stop.is_set():
                return None
            if not self.handle_group(items):
                return FAILED_EXIT
            if self.memory_mib is not None and (resident := resident_mib()) > self.memory_mib:
                log.warning("worker %d: %d MiB resident after a chunk, over %d MiB: retiring to give it back",
                            self.worker_id, resident, self.memory_mib)  # fmt: skip
                return RETIRED_EXIT
        return None

    def handle(self, item: WorkItem) -> bool:
        """``handle_group`` of one chunk."""
        return self.handle_group([item])

    def handle_group(self, items: list[WorkItem]) -> bool:
        """Answer every image of ``items`` (one ``ItemDone`` per chunk, all in one message), or
        return False, answering nothing, when the pipeline is left unusable (``_unusable``): this
        worker must then exit, and the pool retries the chunks' images one by one on a fresh one.
        Any other failure of the pipeline answers the images of the chunk it failed on INTERNAL (a
        group that fails runs again chunk by chunk), as a worker that goes on can."""
        if self.current is not None:
            self.current.value = items[-1].item_id  # the pool counts every chunk up to it as started
        taken = time.monotonic()
        outcomes: dict[int, dict[int, ImageOutcome]] = {item.item_id: {} for item in items}
        live = [item for item in items if taken <= item.deadline]
        _fail_open([item for item in items if item not in live], outcomes, Code.DEADLINE_EXCEEDED,
                   "deadline exceeded before processing")  # fmt: skip
        ran = self._run_or_split(live, taken, outcomes)
        if ran is None:
            return False
        readable, answered = ran
        send(self.results, tuple(ItemDone(self.worker_id, i, tuple(outcomes[i].values())) for i in outcomes))
        self.budget.answered(time.monotonic() - taken)
        if items[0].route == ROUTE_SHADOW and self.candidate is not None and readable:
            self._shadow(readable, answered)
        return True

    def _run_or_split(
        self, live: list[WorkItem], taken: float, outcomes: dict[int, dict[int, ImageOutcome]]
    ) -> tuple[list[tuple[ImageRef, memoryview]], list[ImageOutcome]] | None:
        """``_run`` of the group; if the pipeline fails on it, of each chunk alone, so that a failure
        answers only its own chunk's images INTERNAL. The images read and their outcomes as the
        pipeline numbered them (none after a split: no shadow run), or None: the pipeline is left
        unusable (nothing is answered, the worker must go)."""
        if len(live) > 1:
            try:
                return self._run(live, taken, outcomes)
            except Exception as exc:
                log.exception("worker %d: chunks %s failed together", self.worker_id, [i.item_id for i in live])
                if _unusable(exc):
                    return None
        ran: tuple[list[tuple[ImageRef, memoryview]], list[ImageOutcome]] = ([], [])
        for item in live:
            try:
                alone = self._run([item], taken, outcomes)
            except Exception as exc:
                log.exception("worker %d: chunk %d of batch %s failed", self.worker_id, item.item_id, item.batch_id)
                if _unusable(exc):
                    return None
                _fail_open([item], outcomes, Code.INTERNAL, "pipeline error")
                continue
            ran = alone if len(live) == 1 else ran
        return ran

    def _shadow(self, readable: list[tuple[ImageRef, memoryview]], answered: list[Any]) -> None:
        """Run the candidate on the images just answered and send only how far it agrees
        (``stage.shadow``); skipped, and counted, while shadow runs are over their budget."""
        assert self.candidate is not None
        if not self.budget.allows():
            self.results.send(ShadowDone(self.worker_id, skipped=True))
            return
        t0 = time.monotonic()
        try:
            theirs = list(self.candidate.process("", readable))
        except Exception:  # the candidate's failure is the trial's finding, never the answer's
            log.exception("worker %d: the candidate failed on a shadow chunk", self.worker_id)
            theirs = []
        self.budget.spent(time.monotonic() - t0)
        self.results.send(ShadowDone(self.worker_id, compare(answered, theirs)))

    def _run(
        self, items: list[WorkItem], taken: float, outcomes: dict[int, dict[int, ImageOutcome]]
    ) -> tuple[list[tuple[ImageRef, memoryview]], list[ImageOutcome]]:
        """Read the chunks' images and run the pipeline once on those that could be read, into
        ``outcomes`` by chunk (the candidate's, for chunks routed ``ROUTE_CANARY``); the images
        read and their outcomes, as the pipeline numbered them."""
        t0 = time.perf_counter()
        data = self.reader.read_all(items)
        read_ms = (time.perf_counter() - t0) * 1e3
        group = Group(items)
        readable: list[tuple[ImageRef, memoryview]] = []
        for item, got in zip(items, data, strict=True):
            for ref, d in zip(item.images, got, strict=True):
                if isinstance(d, str):
                    outcomes[item.item_id][ref.index] = ImageOutcome.failed(item.batch_id, ref, Code.DATA_LOSS, d)
                else:
                    readable.append((group.add(item, ref), d))
        queue_ms = {item.item_id: max(0.0, taken - item.submitted) * 1e3 for item in items if item.submitted}
        # The hash of what was read, when the front caches results: it stores an answer only under
        # the key of the bytes that produced it (a client that rewrites its file cannot poison it).
        digests = {ref.index: image_digest(d) for ref, d in readable} if self.digests else {}
        route = items[0].route
        pipeline = self.candidate if route == ROUTE_CANARY and self.candidate is not None else self.pipeline
        models = pipeline.models  # the versions that answered, in every result
        answered = []
        single_queue = queue_ms.get(items[0].item_id) if group.single else None
        together = len(readable)
        for outcome in pipeline.process(group.batch_id, readable, read_ms, single_queue):
            kept = models if outcome.code == Code.OK else ()
            # Every outcome carries its models and batch size; this server's pipelines set them
            # themselves, so only a digest (or a pipeline that left them out) costs a copy.
            if digests or outcome.models != kept or outcome.batch_images != together:
                digest = digests.get(outcome.index, b"")
                outcome = replaced(outcome, digest=digest, models=kept, batch_images=together)
            answered.append(outcome)
            item, mine = group.back(outcome, queue_ms)
            outcomes[item.item_id][mine.index] = mine
        return readable, answered


def _fail_open(items: list[WorkItem], outcomes: dict[int, dict[int, ImageOutcome]], code: Code, reason: str) -> None:
    """Answer every image of ``items`` not answered yet with ``code`` and ``image N: reason``."""
    for item in items:
        for ref in item.images:
            if ref.index not in outcomes[item.item_id]:
                message = f"image {ref.index}: {reason}"
                outcomes[item.item_id][ref.index] = ImageOutcome.failed(item.batch_id, ref, code, message)


def image_digest(data: memoryview | bytes) -> bytes:
    """BLAKE2b-128 of an image's bytes: the result cache's key (``front.result_cache``)."""
    return hashlib.blake2b(data, digest_size=16).digest()


# What a pipeline that failed this way can no longer be trusted after: an allocation that failed
# (DALI then refuses all further work: "Current pipeline object is no longer valid").
_UNUSABLE = ("std::bad_alloc", "no longer valid", "out of memory", "Cannot allocate memory")


def _unusable(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or any(mark in str(exc) for mark in _UNUSABLE)


_STATM: list[int] = []  # this process's /proc/self/statm, opened once (a worker reads it after every chunk)


def resident_mib() -> int:
    """This process's resident memory in MiB: one ``pread`` of ``/proc/self/statm``, held open (the
    kernel renders it afresh on every read)."""
    if not _STATM:
        _STATM.append(os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC))
    return int(os.pread(_STATM[0], 128, 0).split()[1]) * os.sysconf("SC_PAGE_SIZE") // (1 << 20)


def _data_mib() -> int:
    """This process's data segment in MiB (what RLIMIT_DATA limits)."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmData:"):
                return int(line.split()[1]) // 1024
    return 0


def _check_memory_bound(options: WorkerOptions) -> None:
    """Once the models are loaded: refuse a bound the worker is already over (it would retire after
    every chunk), then, on cpu, let the data segment grow by at most twice the bound beyond what
    loading took (not on gpu: the CUDA driver's host-side reservations would count against it, and
    that is not measured here)."""
    if options.memory_mib is None:
        return
    if (resident := resident_mib()) >= options.memory_mib:
        raise RuntimeError(f"{resident} MiB resident with the models loaded, over --worker-memory-mib "
                           f"{options.memory_mib}: raise it (or set 0 for no bound)")  # fmt: skip
    if options.device != "cpu":
        return
    limit = (_data_mib() + 2 * options.memory_mib) << 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def _set_up(
    worker_id: int, repo_dir: str, options: WorkerOptions
) -> tuple[VisionPipeline | NullPipeline, VisionPipeline | None, WorkerReady]:
    """Load the models (and the candidate beside them, if one is under trial), warm them up and
    check the memory bound; the pipelines and the report to send. Raises what went wrong."""
    # Heavy imports only after limit_threads.
    from infer_server.stage.model_repo import ModelRepository
    from infer_server.stage.pipeline import NullPipeline, VisionPipeline

    pipeline: VisionPipeline | NullPipeline
    if options.null_model:
        pipeline = NullPipeline(options, worker_id)
    else:
        pipeline = VisionPipeline.load(repo_dir, options, worker_id)
    pipeline.warm_up()
    candidate = None
    if options.candidate and isinstance(pipeline, VisionPipeline):
        candidate = pipeline.candidate(repo_dir, options)
        candidate.warm_up()
    _check_memory_bound(options)
    catalog = () if options.null_model else ModelRepository.catalog(repo_dir)
    trial = candidate.models if candidate is not None else ()
    profile = pipeline.profile if isinstance(pipeline, VisionPipeline) else ""
    ready = WorkerReady(worker_id, os.getpid(), pipeline.models, candidate=trial, catalog=catalog, profile=profile)
    return pipeline, candidate, ready


def run_worker(
    worker_id: int, repo_dir: str, options: WorkerOptions, inbox: Connection, results: Connection, stop: Event,
    current: Any = None,
) -> None:  # fmt: skip
    """Process target: set up, report READY or the setup error, then serve until stopped."""
    limit_threads(options.intra_op_threads)
    # Ctrl-C reaches the whole process group; shutting down is the parent's call (stop marker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=options.log_level,
        format=f"%(asctime)s worker-{worker_id} {options.log_mark}%(levelname)s %(name)s: %(message)s",
    )
    _pin(worker_id, options)
    _exit_with_parent()
    try:
        pipeline, candidate, ready = _set_up(worker_id, repo_dir, options)
    except Exception as exc:
        log.exception("worker %d: setup failed", worker_id)
        results.send(WorkerFailed(worker_id, f"{type(exc).__name__}: {exc}"))
        return
    heap.settle(young=None)  # the models and pipelines stay: out of the collector's sight
    results.send(ready)
    code = None
    try:
        worker = StageWorker(worker_id, pipeline, results, current, memory_mib=options.memory_mib,
                             digests=options.digest_images)  # fmt: skip
        worker.candidate, worker.budget = candidate, Budget(options.shadow_budget)
        if options.dynamic_batching:
            worker.gathering = (options.batch_size, options.max_queue_delay_us / 1e6)
        code = worker.serve(inbox, stop)
    except (BrokenPipeError, ConnectionResetError):
        log.warning("worker %d: the pool went away", worker_id)
    finally:
        if candidate is not None:
            candidate.close()
        pipeline.close()
    if code is not None:
        sys.exit(code)
