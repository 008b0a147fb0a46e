"""Dynamic batching: chunks of different requests waiting for one worker run as one model batch,
and every image is still answered once, under its own batch, index and name, exactly as it would
be answered alone; the pool counts every chunk of a group as started when its worker dies."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from infer_server.messages import STOP, Code, ImageRef, ItemDone, WorkItem, loads
from infer_server.stage.pipeline import VisionPipeline
from infer_server.stage.worker import StageWorker
from infer_server.supervisor.channels import Inbox
from infer_server.supervisor.ledger import Chunk
from infer_server.supervisor.processes import WorkerProcess, report_death
from tests.helpers import worker_options
from tests.integration.test_worker import BLOBS, reader, shm_fixture, write_batch  # noqa: F401 (a fixture)


class Counting:
    """The real pipeline, and the size of every batch it was given."""

    def __init__(self, pipeline: VisionPipeline) -> None:
        self.pipeline, self.batches = pipeline, []  # type: ignore[var-annotated]
        self.models = pipeline.models

    def process(self, batch_id: str, images: Sequence[tuple[ImageRef, Any]], *args: Any) -> Any:
        self.batches.append(len(images))
        return self.pipeline.process(batch_id, images, *args)


@pytest.fixture(scope="module")
def pipeline(model_repo_dir: Path) -> Iterator[VisionPipeline]:
    p = VisionPipeline.load(model_repo_dir, worker_options(batch_size=8), worker_id=3)
    yield p
    p.close()


def chunks(shm_dir: Path, blobs: list[bytes], **changes: Any) -> list[WorkItem]:
    """One single-image chunk per blob, each of its own batch (as from many clients), due in 5 min
    (far enough for the tests' 60 s queue delay: waiting ends a delay before the deadline)."""
    items = []
    for n, blob in enumerate(blobs):
        item = write_batch(shm_dir / f"b{n}", [blob], deadline_s=300.0, batch_id=f"client-{n}")
        items.append(dataclasses.replace(item, item_id=n + 1, submitted=time.monotonic(), **changes))
    return items


def serve(pipeline: Any, items: list[WorkItem], gathering: tuple[int, float] | None, later: Sequence[WorkItem] = (),
          after_first: bool = False) -> list[ItemDone]:  # fmt: skip
    """Every answer to ``items`` (queued at once), then to ``later`` (sent once the worker runs,
    or once it answered its first chunk)."""
    inbox, pool_end = multiprocessing.Pipe(duplex=False)
    parent, child = multiprocessing.Pipe(duplex=False)
    for item in items:
        pool_end.send(item)
    worker = StageWorker(3, pipeline, child, reader=reader())
    worker.gathering = gathering
    thread = threading.Thread(target=worker.serve, args=(inbox, multiprocessing.Event()), daemon=True)
    thread.start()
    done = received(parent) if after_first else []
    for item in later:
        pool_end.send(item)
    while len(done) < len(items) + len(later):
        done += received(parent)
    pool_end.send(STOP)
    thread.join(30)
    assert not thread.is_alive() and not parent.poll()
    return done


def received(parent: Connection) -> list[ItemDone]:
    """The next message's ItemDones (a group's come as one tuple)."""
    return list(loads(parent.recv_bytes()))


def answers(done: list[ItemDone]) -> dict[str, tuple[Any, ...]]:
    return {
        o.batch_id: (o.index, o.name, o.code, o.message, [(d.label, d.box) for d in o.detections])
        for m in done for o in m.outcomes
    }  # fmt: skip


def test_waiting_chunks_run_as_one_batch_and_answer_as_alone(pipeline: VisionPipeline, shm: Path) -> None:
    blobs = [BLOBS[0], BLOBS[1], BLOBS[2], BLOBS[0]]  # BLOBS[1] does not decode
    alone, together = Counting(pipeline), Counting(pipeline)
    one_by_one = serve(alone, chunks(shm, blobs), gathering=None)
    grouped = serve(together, chunks(shm, blobs), gathering=(8, 0.0))
    assert alone.batches == [1, 1, 1, 1] and together.batches == [4]
    assert [m.item_id for m in grouped] == [1, 2, 3, 4], "one ItemDone per chunk, in order"
    assert answers(grouped) == answers(one_by_one)
    broken = answers(grouped)["client-1"]
    assert broken[2] == Code.INVALID_ARGUMENT and broken[3].startswith("image 0: "), "its own index in the message"
    assert {o.batch_images for m in grouped for o in m.outcomes if o.code == Code.OK} == {4}


def test_a_group_is_answered_in_one_message(pipeline: VisionPipeline, shm: Path) -> None:
    inbox, pool_end = multiprocessing.Pipe(duplex=False)
    parent, child = multiprocessing.Pipe(duplex=False)
    for item in chunks(shm, [BLOBS[0]] * 3):
        pool_end.send(item)
    pool_end.send(STOP)
    worker = StageWorker(3, pipeline, child, reader=reader())
    worker.gathering = (8, 0.0)
    worker.serve(inbox, multiprocessing.Event())
    message = loads(parent.recv_bytes())
    assert isinstance(message, tuple) and [done.item_id for done in message] == [1, 2, 3]
    assert not parent.poll(), "one write for the group"


def test_a_group_holds_one_route_and_at_most_a_batch(pipeline: VisionPipeline, shm: Path) -> None:
    items = chunks(shm, [BLOBS[0]] * 5)
    items[2] = dataclasses.replace(items[2], route=2)  # a shadow-routed chunk between stable ones
    counting = Counting(pipeline)
    done = serve(counting, items, gathering=(2, 0.0))
    assert counting.batches == [2, 1, 2]
    assert sorted(m.item_id for m in done) == [1, 2, 3, 4, 5]


def test_a_batch_not_full_waits_up_to_the_queue_delay(pipeline: VisionPipeline, shm: Path) -> None:
    first, second = chunks(shm, [BLOBS[0], BLOBS[2]])
    counting = Counting(pipeline)
    serve(counting, [first], gathering=(2, 60.0), later=[second])  # runs once full: the second made it so
    assert counting.batches == [2]
    # Submitted longer ago than the delay: each runs as soon as it is taken, however empty its batch.
    stale, later = (dataclasses.replace(item, submitted=time.monotonic() - 120.0)
                    for item in chunks(shm, [BLOBS[0], BLOBS[2]]))  # fmt: skip
    counting = Counting(pipeline)
    done = serve(counting, [stale], gathering=(8, 60.0), later=[later], after_first=True)
    assert counting.batches == [1, 1] and [m.item_id for m in done] == [1, 2]


def test_a_dead_workers_chunks_up_to_its_current_count_as_started() -> None:
    """The worker took chunks 1 and 2 as one group (``current`` = 2); 3 was still in its inbox."""
    held = {}
    for item_id in (1, 2, 3):
        item = WorkItem(item_id, f"b{item_id}", None, (ImageRef(0, 0, 1),), 0.0)  # type: ignore[arg-type]
        held[item_id] = Chunk(item, {0})
    current = multiprocessing.get_context("spawn").RawValue("q", 2)
    process = type("Dead", (), {"pid": 1, "exitcode": -9})()
    worker = WorkerProcess(0, process, None, None, current, held=held)  # type: ignore[arg-type]
    report_death(worker, 60.0)
    assert [c.started for c in held.values()] == [True, True, False]
    current.value = 7  # answered its last group, took nothing since
    report_death(worker, 60.0)
    assert not any(c.started for c in held.values())


def test_credit_is_counted_in_images() -> None:
    reader_end, writer_end = multiprocessing.Pipe(duplex=False)
    inbox = Inbox(writer_end, batch_size=8, wanted=16, least=2)
    assert inbox.items == 16, "a 1 MiB inbox takes 16 chunks of 8 images"
    worker = WorkerProcess(0, None, inbox, None, None, ready=True)  # type: ignore[arg-type]
    for item_id in range(1, 16):
        item = WorkItem(item_id, "b", None, (ImageRef(0, 0, 1),), 0.0)  # type: ignore[arg-type]
        worker.hold(Chunk(item, {0}))
    assert worker.has_credit(batch_size=8, images=1), "15 single images: room for one more"
    worker.hold(Chunk(dataclasses.replace(item, item_id=16), {0}))
    assert not worker.has_credit(batch_size=8, images=1), "as many chunks as its inbox takes"
    assert all(worker.release(item_id) is not None for item_id in range(1, 17))
    assert worker.held == {} and worker.held_images == 0
    eight = WorkItem(99, "b", None, tuple(ImageRef(i, 0, 1) for i in range(8)), 0.0)  # type: ignore[arg-type]
    worker.hold(Chunk(eight, set(range(8))))
    assert worker.has_credit(batch_size=8, images=8), "one batch running, one waiting"
    worker.hold(Chunk(dataclasses.replace(eight, item_id=100), set(range(8))))
    assert not worker.has_credit(batch_size=8, images=1), "two batches held: not one image more"
    assert worker.release(5) is None and worker.held_images == 16, "a chunk it does not hold changes nothing"
    inbox.close()
    reader_end.close()


class Failing(Counting):
    """The real pipeline, failing (not fatally) on any batch that holds ``BLOBS[2]``."""

    def process(self, batch_id: str, images: Sequence[tuple[ImageRef, Any]], *args: Any) -> Any:
        self.batches.append(len(images))
        if any(bytes(data) == BLOBS[2] for _, data in images):
            raise RuntimeError("this image breaks a stage")
        return self.pipeline.process(batch_id, images, *args)


def test_a_group_that_fails_runs_again_chunk_by_chunk(pipeline: VisionPipeline, shm: Path) -> None:
    failing = Failing(pipeline)
    done = serve(failing, chunks(shm, [BLOBS[0], BLOBS[2], BLOBS[0]]), gathering=(8, 0.0))
    assert failing.batches == [3, 1, 1, 1], "together, then each alone"
    codes = {o.batch_id: (o.code, o.message) for m in done for o in m.outcomes}
    assert codes["client-1"] == (Code.INTERNAL, "image 0: pipeline error")
    assert codes["client-0"][0] == codes["client-2"][0] == Code.OK, "nobody else's image fails with it"


def test_a_retry_runs_alone(pipeline: VisionPipeline, shm: Path) -> None:
    """A chunk back after its worker died under it may hold the image that kills workers."""
    items = chunks(shm, [BLOBS[0]] * 4)
    items[1] = dataclasses.replace(items[1], attempt=2)
    counting = Counting(pipeline)
    serve(counting, items, gathering=(8, 0.0))
    assert counting.batches == [1, 1, 2]


def test_waiting_for_more_ends_before_a_chunks_deadline(pipeline: VisionPipeline, shm: Path) -> None:
    (item,) = chunks(shm, [BLOBS[0]])
    item = dataclasses.replace(item, deadline=time.monotonic() + 0.5)  # sooner than the delay
    (done,) = serve(Counting(pipeline), [item], gathering=(8, 30.0))
    assert [o.code for o in done.outcomes] == [Code.OK], "run in time, not expired waiting"


def test_a_failed_read_leaves_no_descriptor_open(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    items = chunks(shm, [BLOBS[0], BLOBS[2], BLOBS[0]])
    before = len(os.listdir("/proc/self/fd"))

    def broken(*args: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    with pytest.raises(OSError):
        reader().read_all(items)
    monkeypatch.undo()
    assert len(os.listdir("/proc/self/fd")) == before
