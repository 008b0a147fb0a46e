"""The supervisor with real worker processes: exactly one outcome per image, through SIGKILL and stop.

As in the server, an asyncio loop (here in a thread of its own) reads the workers' pipes and runs
every callback, and the test calls ``start`` / ``stop`` off that loop.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from engines.scenes import generate_scene
from infer_server.messages import Code, FileRef, ImageOutcome, ImageRef
from infer_server.supervisor.pool import PipelineError, PipelinePool
from tests.helpers import OpenWatch, worker_options

JPEGS = [generate_scene(seed).jpeg for seed in range(100, 106)]
NOT_AN_IMAGE = b"not an image at all"
WAIT_S = 120.0  # generous: two workers share two busy cores with a training job


class LoopThread:
    """An asyncio loop running in a thread of its own: the server's loop, for a test that blocks."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10.0)
        self.loop.close()


class Collector:
    """What the pool reports, with waits on a condition (never sleeps)."""

    def __init__(self) -> None:
        self.outcomes: list[ImageOutcome] = []
        self.health: list[bool] = []
        self.threads: set[str] = set()  # where the callbacks ran
        self._cond = threading.Condition()

    def on_outcomes(self, outcomes: list[ImageOutcome]) -> None:
        with self._cond:
            self.outcomes += outcomes
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def on_health(self, healthy: bool) -> None:
        with self._cond:
            self.health.append(healthy)
            self.threads.add(threading.current_thread().name)
            self._cond.notify_all()

    def of(self, batch_id: str) -> list[ImageOutcome]:
        with self._cond:
            return [o for o in self.outcomes if o.batch_id == batch_id]

    def wait(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> None:
        with self._cond:
            assert self._cond.wait_for(predicate, timeout), "timed out waiting for the pool"

    def wait_all(self, batch_id: str, n: int) -> list[ImageOutcome]:
        self.wait(lambda: len([o for o in self.outcomes if o.batch_id == batch_id]) >= n)
        return self.of(batch_id)


HELD: list[int] = []  # descriptors of submitted files, held as the front holds them
WATCHES: list[OpenWatch] = []


@pytest.fixture
def shm() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="infer-pool-", dir="/dev/shm"))
    yield base
    while HELD:
        os.close(HELD.pop())
    while WATCHES:
        WATCHES.pop().close()
    shutil.rmtree(base, ignore_errors=True)


def submit(
    pool: PipelinePool, path: Path, batch_id: str, blobs: list[bytes], deadline_s: float = 300.0
) -> OpenWatch:
    """Write ``blobs`` back to back into ``path`` (what the client library does) and submit them;
    a watch on the file that ``wait``s until a worker opened it (took a chunk of it)."""
    path.write_bytes(b"".join(blobs))
    refs, offset = [], 0
    for i, blob in enumerate(blobs):
        refs.append(ImageRef(i, offset, len(blob), f"img{i}"))
        offset += len(blob)
    ref = file_ref(path)
    watch = OpenWatch(path)  # after the front's own open: the next one is a worker's
    WATCHES.append(watch)
    pool.submit_batch(batch_id, ref, refs, time.monotonic() + deadline_s)
    return watch


def file_ref(path: Path) -> FileRef:
    """The file opened as the front opens a validated batch (the workers read through it)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    HELD.append(fd)
    st = os.fstat(fd)
    return FileRef(str(path), st.st_dev, st.st_ino, st.st_size, fd)


def all_workers() -> dict[int, multiprocessing.Process]:
    return {p.pid: p for p in multiprocessing.active_children() if p.name.startswith("infer-worker-") and p.pid}


def assert_once_each(outcomes: list[ImageOutcome], n: int) -> None:
    assert sorted(o.index for o in outcomes) == list(range(n)), "exactly one outcome per image"


class Harness:
    """A started pool, what it reported, and which worker processes are its own."""

    def __init__(
        self, repo: Path, workers: int = 2, max_attempts: int = 2, max_chunk_seconds: float = 60.0, **settings: Any
    ) -> None:
        self.collector = Collector()
        self._others = set(all_workers())  # workers of a pool started earlier (the module's)
        self.loop = LoopThread()
        self.pool = PipelinePool(
            repo, worker_options(**settings), workers=workers, max_attempts=max_attempts,
            max_chunk_seconds=max_chunk_seconds, loop=self.loop.loop,
            on_outcomes=self.collector.on_outcomes, on_health=self.collector.on_health,
        )  # fmt: skip
        self.pool.start(timeout=WAIT_S)
        self.collector.wait(lambda: self.collector.health == [True])  # reported on the loop

    def workers(self) -> dict[str, multiprocessing.Process]:
        return {p.name: p for pid, p in all_workers().items() if pid not in self._others}

    def busy_worker(self, watch: OpenWatch) -> multiprocessing.Process:
        """The worker busy with a chunk of ``watch``'s batch: it took (``current``) one the pool
        still holds for it (white box), seen when it opens the batch file (it sets ``current``
        first, then reads)."""
        assert watch.wait(WAIT_S), "no worker took a chunk"
        with self.pool._cond:
            busy = [w.slot for w in self.pool._slots if w is not None and w.current.value in w.held]
        assert busy, "a worker opened the batch without holding a chunk of it"
        return self.workers()[f"infer-worker-{busy[0]}"]

    def stop_and_check(self, drain: bool) -> None:
        """stop() leaves none of this pool's workers alive; every callback ran on the loop."""
        pids = [p.pid for p in self.workers().values()]
        self.pool.stop(timeout=30.0, drain=drain)
        self.loop.loop.call_soon_threadsafe(lambda: None)  # let callbacks queued by stop() run
        assert not self.workers(), "a worker outlived stop()"
        for pid in pids:
            with pytest.raises(ProcessLookupError):  # reaped, not a zombie
                os.kill(pid, 0)
        self.collector.wait(lambda: not self.pool.healthy and self.collector.health[-1:] == [False])
        self.loop.close()
        assert self.collector.threads == {"test-loop"}, "a callback ran off the loop"


@pytest.fixture(scope="module")
def harness(model_repo_dir: Path) -> Iterator[Harness]:
    h = Harness(model_repo_dir, workers=2, batch_size=4, max_attempts=2)
    yield h
    h.stop_and_check(drain=True)


def test_every_image_gets_exactly_one_outcome(harness: Harness, shm: Path) -> None:
    pool, collector = harness.pool, harness.collector
    assert pool.healthy and collector.health == [True]
    blobs = [*JPEGS, NOT_AN_IMAGE, *JPEGS[:3]]
    submit(pool, shm / "b1", "b1", blobs)
    outcomes = collector.wait_all("b1", len(blobs))
    assert_once_each(outcomes, len(blobs))
    by_index = {o.index: o for o in outcomes}
    assert (by_index[6].code, by_index[6].message) == (Code.INVALID_ARGUMENT, "image 6: not a JPEG or PNG")
    ok = [o for o in outcomes if o.index != 6]
    assert all(o.code == Code.OK and o.width > 0 for o in ok)
    assert all(dict(o.timings_ms).keys() >= {"read", "decode", "detector", "queue"} for o in ok)
    assert all(dict(o.timings_ms)["detector"] > 0 for o in ok)


def test_names_come_back_even_when_a_chunk_is_too_large_for_the_inbox_with_them(harness: Harness, shm: Path) -> None:
    path = shm / "named"
    path.write_bytes(b"".join(JPEGS[:4]))
    names = [f"{i}" * 150_000 for i in range(4)]  # 600 KB of names: more than an inbox takes at once
    refs = [ImageRef(i, sum(map(len, JPEGS[:i])), len(JPEGS[i]), names[i]) for i in range(4)]
    harness.pool.submit_batch("named", file_ref(path), refs, time.monotonic() + 300)
    outcomes = harness.collector.wait_all("named", 4)
    assert sorted((o.index, o.name, o.code) for o in outcomes) == [(i, names[i], Code.OK) for i in range(4)]


def test_work_past_its_deadline_is_answered(harness: Harness, shm: Path) -> None:
    submit(harness.pool, shm / "late", "late", JPEGS[:5], deadline_s=-1.0)
    outcomes = harness.collector.wait_all("late", 5)
    assert_once_each(outcomes, 5)
    assert {o.code for o in outcomes} == {Code.DEADLINE_EXCEEDED}


def test_a_worker_killed_mid_chunk_is_replaced_and_its_images_retried(harness: Harness, shm: Path) -> None:
    pool, collector = harness.pool, harness.collector
    # Each chunk (4 images) holds a bad image and three that take the models a while: a worker is
    # killed as soon as it has taken one.
    blobs = [b for _ in range(4) for b in (NOT_AN_IMAGE, *JPEGS[:3])]
    health_before = len(collector.health)
    victim = harness.busy_worker(submit(pool, shm / "b2", "b2", blobs))
    os.kill(victim.pid, signal.SIGKILL)
    outcomes = collector.wait_all("b2", len(blobs))
    collector.wait(lambda: collector.health[health_before:] == [False, True])
    assert_once_each(outcomes, len(blobs))
    assert {o.index for o in outcomes if o.code == Code.INVALID_ARGUMENT} == {0, 4, 8, 12}
    assert all(o.code == Code.OK for o in outcomes if o.index % 4), "retried images succeed"
    assert pool.healthy and len(harness.workers()) == 2
    assert victim.pid not in [w.pid for w in harness.workers().values()]


def test_the_last_attempt_answers_unavailable(model_repo_dir: Path, shm: Path) -> None:
    h = Harness(model_repo_dir, workers=1, batch_size=8, max_attempts=1)
    blobs = [NOT_AN_IMAGE, *JPEGS]
    watch = submit(h.pool, shm / "b3", "b3", blobs)
    os.kill(h.busy_worker(watch).pid, signal.SIGKILL)  # the chunk (all 9 images) is running
    outcomes = h.collector.wait_all("b3", len(blobs))
    h.stop_and_check(drain=False)
    assert_once_each(outcomes, len(blobs))
    crashed = [o for o in outcomes if o.code == Code.UNAVAILABLE]
    assert len(crashed) == len(blobs), "a chunk is answered in one message: the dead worker sent nothing of it"
    assert {o.message for o in crashed} == {
        f"image {o.index}: worker crashed while processing this image" for o in crashed
    }


def test_a_worker_stuck_on_a_chunk_is_replaced_and_the_image_that_held_it_fails_alone(
    model_repo_dir: Path, shm: Path
) -> None:
    """Finding: deadlines were checked only before a chunk started, so an image that held a worker
    (a decode that never ends) held it for good. Here the worker is frozen (SIGSTOP) mid-chunk."""
    h = Harness(model_repo_dir, workers=1, batch_size=1, max_attempts=1, max_chunk_seconds=1.0)
    frozen = h.busy_worker(submit(h.pool, shm / "stuck", "stuck", JPEGS[:2]))
    os.kill(frozen.pid, signal.SIGSTOP)
    outcomes = h.collector.wait_all("stuck", 2)
    h.collector.wait(lambda: h.collector.health[-2:] == [False, True])  # replaced, serving again
    assert not frozen.is_alive()
    by_index = {o.index: o for o in outcomes}
    assert (by_index[0].code, by_index[0].message) == (Code.UNAVAILABLE, "image 0: took longer than 1 s to process")
    assert by_index[1].code == Code.OK, "the next chunk runs on the replacement"
    h.stop_and_check(drain=True)


def test_stop_without_drain_answers_everything_and_leaves_no_child(model_repo_dir: Path, shm: Path) -> None:
    h = Harness(model_repo_dir, workers=1, batch_size=2)
    blobs = JPEGS * 2
    submit(h.pool, shm / "b4", "b4", blobs)
    h.collector.wait(lambda: len(h.collector.of("b4")) >= 1)
    h.stop_and_check(drain=False)
    outcomes = h.collector.of("b4")
    assert_once_each(outcomes, len(blobs))
    assert {o.code for o in outcomes} == {Code.OK, Code.UNAVAILABLE}
    unavailable = [o for o in outcomes if o.code == Code.UNAVAILABLE]
    assert {o.message for o in unavailable} == {f"image {o.index}: server is shutting down" for o in unavailable}
    assert not h.pool.healthy and h.collector.health == [True, False]
    with pytest.raises(PipelineError, match="not running"):
        submit(h.pool, shm / "b5", "b5", JPEGS[:1])


def test_a_broken_repository_fails_start_with_the_workers_message(model_repo_dir: Path, tmp_path: Path) -> None:
    for config in model_repo_dir.glob("*/config.yaml"):  # every config, but the detector's weights lost
        (tmp_path / config.parent.name).mkdir()
        (tmp_path / config.parent.name / "config.yaml").symlink_to(config)
        if config.parent.name != "detector":
            (tmp_path / config.parent.name / "model.onnx").symlink_to(config.parent / "model.onnx")
    others, loop = set(all_workers()), LoopThread()
    pool = PipelinePool(
        tmp_path, worker_options(), workers=2, max_attempts=2, loop=loop.loop, on_outcomes=lambda o: None
    )
    try:
        with pytest.raises(PipelineError, match=r"worker \d failed to start: ValueError: .*missing model\.onnx"):
            pool.start(timeout=WAIT_S)
    finally:
        loop.close()
    assert set(all_workers()) <= others, "start() cleans up after a failure"


def test_start_and_stop_refuse_to_block_the_loop_that_reads_the_workers(model_repo_dir: Path) -> None:
    async def main() -> None:
        pool = PipelinePool(
            model_repo_dir, worker_options(null_model=True), workers=1, max_attempts=2,
            loop=asyncio.get_running_loop(), on_outcomes=lambda o: None,
        )  # fmt: skip
        with pytest.raises(PipelineError, match="off the loop"):
            pool.start()  # it would wait for READY messages only this loop can read
        with pytest.raises(PipelineError, match="off the loop"):
            pool.stop()

    asyncio.run(main())


def thread_cpus(pid: int) -> set[frozenset[int]]:
    """The CPU sets of every thread of process ``pid``."""
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def test_pinned_workers_run_every_thread_on_their_own_cpu_and_so_does_a_replacement(
    model_repo_dir: Path, shm: Path
) -> None:
    """``--pin-workers``: worker N and every thread its libraries started (the decoder's) on CPU N of
    the server's set, in turn; a worker that dies is replaced on its slot's CPU, and answers."""
    cpus = sorted(os.sched_getaffinity(0))
    h = Harness(model_repo_dir, workers=2, batch_size=2, pin_workers=True)
    try:
        want = {f"infer-worker-{n}": {frozenset({cpus[n % len(cpus)]})} for n in range(2)}
        workers = h.workers()
        assert {name: thread_cpus(p.pid) for name, p in workers.items()} == want
        assert all(len(os.listdir(f"/proc/{p.pid}/task")) > 2 for p in workers.values()), "library threads too"
        os.kill(workers["infer-worker-1"].pid, signal.SIGKILL)
        h.collector.wait(lambda: h.collector.health[-2:] == [False, True])
        assert {name: thread_cpus(p.pid) for name, p in h.workers().items()} == want
        submit(h.pool, shm / "after", "after", JPEGS[:4])
        assert {o.code for o in h.collector.wait_all("after", 4)} == {Code.OK}
    finally:
        h.stop_and_check(drain=True)


def test_unpinned_workers_may_run_on_every_cpu_of_the_server(model_repo_dir: Path) -> None:
    h = Harness(model_repo_dir, workers=1, null_model=True)
    try:
        assert thread_cpus(h.workers()["infer-worker-0"].pid) == {frozenset(os.sched_getaffinity(0))}
    finally:
        h.stop_and_check(drain=True)
