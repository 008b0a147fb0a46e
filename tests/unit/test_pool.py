"""The supervisor with real worker processes: exactly one outcome per image, through SIGKILL and stop."""

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
from infer_server.messages import Code, ImageOutcome, ImageRef
from infer_server.pool import PipelineError, PipelinePool

JPEGS = [generate_scene(seed).jpeg for seed in range(100, 106)]
NOT_AN_IMAGE = b"not an image at all"
WAIT_S = 120.0  # generous: two workers share two busy cores with a training job


class Collector:
    """What the pool reports, with waits on a condition (never sleeps)."""

    def __init__(self) -> None:
        self.outcomes: list[ImageOutcome] = []
        self.health: list[bool] = []
        self._cond = threading.Condition()

    def on_outcome(self, outcome: ImageOutcome) -> None:
        with self._cond:
            self.outcomes.append(outcome)
            self._cond.notify_all()

    def on_health(self, healthy: bool) -> None:
        with self._cond:
            self.health.append(healthy)
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


@pytest.fixture
def shm() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="infer-pool-", dir="/dev/shm"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def submit(pool: PipelinePool, path: Path, batch_id: str, blobs: list[bytes], deadline_s: float = 300.0) -> None:
    """Write ``blobs`` back to back into ``path`` (what the client library does) and submit them."""
    path.write_bytes(b"".join(blobs))
    refs, offset = [], 0
    for i, blob in enumerate(blobs):
        refs.append(ImageRef(i, offset, len(blob), f"img{i}"))
        offset += len(blob)
    st = os.stat(path)
    pool.submit_batch(batch_id, str(path), st.st_dev, st.st_ino, st.st_size, refs, time.monotonic() + deadline_s)


def all_workers() -> dict[int, multiprocessing.Process]:
    return {p.pid: p for p in multiprocessing.active_children() if p.name.startswith("infer-worker-") and p.pid}


def assert_once_each(outcomes: list[ImageOutcome], n: int) -> None:
    assert sorted(o.index for o in outcomes) == list(range(n)), "exactly one outcome per image"


class Harness:
    """A started pool, what it reported, and which worker processes are its own."""

    def __init__(self, repo: Path, **options: Any) -> None:
        self.collector = Collector()
        self._others = set(all_workers())  # workers of a pool started earlier (the module's)
        self.pool = PipelinePool(
            repo, on_outcome=self.collector.on_outcome, on_health=self.collector.on_health, **options
        )
        self.pool.start(timeout=WAIT_S)

    def workers(self) -> dict[str, multiprocessing.Process]:
        return {p.name: p for pid, p in all_workers().items() if pid not in self._others}

    def busy_worker(self) -> multiprocessing.Process:
        """A worker busy with a chunk: it took (``current``) one the pool still holds for it (white box)."""
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            with self.pool._cond:
                busy = [w.slot for w in self.pool._slots if w is not None and w.current.value in w.held]
            if busy:
                return self.workers()[f"infer-worker-{busy[0]}"]
            time.sleep(0.001)
        raise AssertionError("no worker took a chunk")

    def stop_and_check(self, drain: bool) -> None:
        """stop() leaves none of this pool's workers alive."""
        pids = [p.pid for p in self.workers().values()]
        self.pool.stop(timeout=30.0, drain=drain)
        assert not self.workers(), "a worker outlived stop()"
        for pid in pids:
            with pytest.raises(ProcessLookupError):  # reaped, not a zombie
                os.kill(pid, 0)


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
    stats = pool.stats()
    assert stats["open_images"] == 0 and stats["images_done"] >= len(ok) and stats["workers_ready"] == 2
    assert stats["stage_ms"]["detector"] > 0


def test_names_come_back_even_when_a_chunk_is_too_large_for_the_inbox_with_them(harness: Harness, shm: Path) -> None:
    path = shm / "named"
    path.write_bytes(b"".join(JPEGS[:4]))
    st = os.stat(path)
    names = [f"{i}" * 150_000 for i in range(4)]  # 600 KB of names: more than an inbox takes at once
    refs = [ImageRef(i, sum(map(len, JPEGS[:i])), len(JPEGS[i]), names[i]) for i in range(4)]
    harness.pool.submit_batch("named", str(path), st.st_dev, st.st_ino, st.st_size, refs, time.monotonic() + 300)
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
    submit(pool, shm / "b2", "b2", blobs)
    victim = harness.busy_worker()
    os.kill(victim.pid, signal.SIGKILL)
    outcomes = collector.wait_all("b2", len(blobs))
    collector.wait(lambda: collector.health[health_before:] == [False, True])
    assert_once_each(outcomes, len(blobs))
    assert {o.index for o in outcomes if o.code == Code.INVALID_ARGUMENT} == {0, 4, 8, 12}
    assert all(o.code == Code.OK for o in outcomes if o.index % 4), "retried images succeed"
    stats = pool.stats()
    assert stats["worker_restarts"] == 1 and stats["images_retried"] >= 1
    assert pool.healthy and len(harness.workers()) == 2
    assert victim.pid not in [w.pid for w in harness.workers().values()]


def test_the_last_attempt_answers_unavailable(model_repo_dir: Path, shm: Path) -> None:
    h = Harness(model_repo_dir, workers=1, batch_size=8, max_attempts=1)
    blobs = [NOT_AN_IMAGE, *JPEGS]
    submit(h.pool, shm / "b3", "b3", blobs)
    os.kill(h.busy_worker().pid, signal.SIGKILL)  # the chunk (all 9 images) is running
    outcomes = h.collector.wait_all("b3", len(blobs))
    h.stop_and_check(drain=False)
    assert_once_each(outcomes, len(blobs))
    crashed = [o for o in outcomes if o.code == Code.UNAVAILABLE]
    assert len(crashed) == len(blobs), "a chunk is answered in one message: the dead worker sent nothing of it"
    assert {o.message for o in crashed} == {
        f"image {o.index}: worker crashed while processing this image" for o in crashed
    }


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
    others = set(all_workers())
    pool = PipelinePool(tmp_path, workers=2, on_outcome=lambda o: None)
    with pytest.raises(PipelineError, match=r"worker \d failed to start: ValueError: .*missing model\.onnx"):
        pool.start(timeout=WAIT_S)
    assert set(all_workers()) <= others, "start() cleans up after a failure"


def test_a_pool_whose_pipes_an_event_loop_reads(model_repo_dir: Path, shm: Path) -> None:
    """The server's mode: no reader thread; outcomes arrive on the loop's thread, deaths still retry."""

    async def main() -> None:
        loop, collector, threads = asyncio.get_running_loop(), Collector(), set()

        def on_outcome(outcome: ImageOutcome) -> None:
            threads.add(threading.get_ident())
            collector.on_outcome(outcome)

        pool = PipelinePool(model_repo_dir, workers=2, batch_size=2, null_model=True, loop=loop, on_outcome=on_outcome)
        with pytest.raises(PipelineError, match="off the loop"):
            pool.start()  # it would wait for READY messages only this loop can read
        others = set(all_workers())  # the module's pool
        await asyncio.to_thread(pool.start, WAIT_S)
        try:
            assert [t.name for t in pool._threads] == ["pool-watcher"], "no reader thread"
            submit(pool, shm / "a", "a", JPEGS)
            await asyncio.to_thread(collector.wait_all, "a", len(JPEGS))
            assert threads == {threading.get_ident()}
            assert_once_each(collector.of("a"), len(JPEGS))

            victim = next(p for pid, p in all_workers().items() if pid not in others)
            victim.kill()  # its pipe reaches EOF on the loop; the replacement's pipe is read there too
            submit(pool, shm / "b", "b", JPEGS)
            await asyncio.to_thread(collector.wait_all, "b", len(JPEGS))
            assert_once_each(collector.of("b"), len(JPEGS))
        finally:
            await asyncio.to_thread(pool.stop, 30.0)
        assert set(all_workers()) <= others, "a worker outlived stop()"

    asyncio.run(main())
