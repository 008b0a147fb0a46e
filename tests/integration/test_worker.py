"""The stage worker's loop in-process: file checks on the open fd, deadlines, the message protocol."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engines.scenes import generate_scene
from infer_server.messages import FAILED_EXIT, STOP, Code, FileRef, ImageOutcome, ImageRef, ItemDone, WorkItem, loads
from infer_server.stage.pipeline import VisionPipeline
from infer_server.stage.worker import ChunkReader, StageWorker
from tests.helpers import worker_options

BLOBS = [generate_scene(7).jpeg, b"definitely not a jpeg", generate_scene(8).jpeg]


HELD: list[int] = []  # descriptors this test process holds as the front would


@pytest.fixture(name="shm")
def shm_fixture() -> Iterator[Path]:
    """A directory on tmpfs for batch files; the descriptors ``write_batch`` held are closed after."""
    base = Path(tempfile.mkdtemp(prefix="infer-worker-", dir="/dev/shm"))
    yield base
    while HELD:
        with contextlib.suppress(OSError):
            os.close(HELD.pop())
    shutil.rmtree(base, ignore_errors=True)


def reader() -> ChunkReader:
    """A reader of this process's descriptors (in the server: its parent's, the front's)."""
    return ChunkReader(owner=os.getpid())


def write_batch(path: Path, blobs: list[bytes], deadline_s: float = 60.0, batch_id: str = "b1") -> WorkItem:
    """Write the batch file and open it as the front does once it validated it."""
    path.write_bytes(b"".join(blobs))
    offsets = [sum(len(b) for b in blobs[:i]) for i in range(len(blobs))]
    images = tuple(ImageRef(i, off, len(b), f"img{i}") for i, (off, b) in enumerate(zip(offsets, blobs, strict=True)))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    HELD.append(fd)
    st = os.fstat(fd)
    file = FileRef(str(path), st.st_dev, st.st_ino, st.st_size, fd)
    return WorkItem(1, batch_id, file, images, time.monotonic() + deadline_s)


def test_reads_each_image_by_its_range(shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    assert reader().read(item) == BLOBS


def test_any_layout_of_ranges_reads_the_same(shm: Path) -> None:
    """Chunks need not be a whole batch, nor in file order, nor back to back."""
    item = write_batch(shm / "batch", BLOBS)
    a, b, c = item.images
    layouts = {
        "a later chunk of a batch": (b, c),
        "out of order": (c, a, b),
        "with a gap": (a, c),
        "overlapping": (a, ImageRef(9, a.offset + 5, 7)),
    }
    for name, refs in layouts.items():
        chunk = WorkItem(1, "b", item.file, refs, item.deadline)
        whole = b"".join(BLOBS)
        assert reader().read(chunk) == [whole[r.offset : r.offset + r.size] for r in refs], name


def test_images_back_to_back_are_read_by_one_system_call(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk as clients write it (each image after the one before) costs one ``preadv``; any
    other layout, one per image."""
    item = write_batch(shm / "batch", BLOBS)
    a, _, c = item.images
    calls: list[int] = []
    real = os.preadv

    def counted(fd: int, buffers: Any, offset: int) -> int:
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    assert reader().read(item) == BLOBS
    assert calls == [0], "the whole chunk in one read"
    calls.clear()
    assert reader().read(WorkItem(1, "b", item.file, (c, a), item.deadline)) == [BLOBS[2], BLOBS[0]]
    assert calls == [c.offset, 0]


def test_a_chunk_of_more_images_than_one_system_call_takes_is_read_too(shm: Path) -> None:
    """``preadv`` takes at most IOV_MAX (1024) buffers: a longer chunk is read image by image."""
    blobs = [bytes([i % 251]) * 3 for i in range(os.sysconf("SC_IOV_MAX") + 10)]
    item = write_batch(shm / "batch", blobs)
    assert reader().read(item) == blobs


def test_a_file_cut_short_during_the_read_fails_only_the_images_it_lost(
    shm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner truncates its file after the worker checked its size: the images still whole are
    read, each image past the cut fails alone (never a crash, never stale bytes)."""
    item = write_batch(shm / "batch", BLOBS)
    b = item.images[1]
    real = os.preadv

    def cut_first(fd: int, buffers: Any, offset: int) -> int:
        os.truncate(shm / "batch", b.offset + 3)  # image 1 is cut, image 2 is gone
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", cut_first)
    got = reader().read(item)
    assert got[0] == BLOBS[0]
    assert got[1:] == ["image 1: batch data was truncated", "image 2: batch data was truncated"]


def test_one_reader_reuses_its_buffer_and_grows_it(shm: Path) -> None:
    one = reader()
    small = write_batch(shm / "small", BLOBS[1:2])
    assert one.read(small) == BLOBS[1:2]
    big = write_batch(shm / "big", BLOBS, batch_id="b2")
    first = one.read(big)
    assert first == BLOBS, "a larger chunk gets a larger buffer"
    again = one.read(big)
    assert again == BLOBS and again[0].obj is first[0].obj, "the same buffer serves the next chunk"


def test_a_file_replaced_at_its_path_after_validation_is_not_what_is_read(shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    (shm / "other").write_bytes(b"x" * item.file.size)
    os.replace(shm / "other", shm / "batch")  # same path and size, another inode
    assert reader().read(item) == BLOBS, "the file the front validated, not the one at the path now"


def test_a_descriptor_number_reused_for_another_file_is_refused(shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    os.close(item.file.fd)  # the batch is done: the front closed it ...
    (shm / "other").write_bytes(b"x" * item.file.size)
    fd = os.open(shm / "other", os.O_RDONLY)  # ... and the number went to another file
    HELD.append(fd)
    assert fd == item.file.fd
    assert reader().read(item) == [f"image {i}: batch data changed after it was accepted" for i in range(3)]


def test_a_file_that_changed_size_is_not_read(shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    with open(shm / "batch", "r+b") as f:
        f.truncate(100)
    assert reader().read(item)[0] == "image 0: batch data changed after it was accepted"


def test_a_closed_descriptor_is_data_no_longer_available(shm: Path) -> None:
    item = write_batch(shm / "real", BLOBS)
    os.close(HELD.pop())
    messages = reader().read(item)
    assert messages == [f"image {i}: batch data is no longer available" for i in range(3)]
    assert not any(str(shm) in m for m in messages), "never echo internal paths"


def test_a_range_outside_the_file_fails_only_that_image(shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    bad = ImageRef(3, item.file.size - 10, 11)
    item = WorkItem(1, "b", item.file, (*item.images, bad), item.deadline)
    assert reader().read(item)[:3] == BLOBS
    assert reader().read(item)[3] == "image 3: byte range lies outside the batch data"


@pytest.fixture(scope="module")
def pipeline(model_repo_dir: Path) -> Iterator[VisionPipeline]:
    p = VisionPipeline.load(model_repo_dir, worker_options(batch_size=4), worker_id=3)
    yield p
    p.close()


def run_item(pipeline: VisionPipeline, item: WorkItem, current: Any = None) -> list[ImageOutcome]:
    """The worker's one message for ``item``: its outcomes."""
    parent, child = multiprocessing.Pipe(duplex=False)
    StageWorker(3, pipeline, child, current, reader()).handle(item)
    (done,) = loads(parent.recv_bytes())
    assert not parent.poll(), "one message per item"
    assert isinstance(done, ItemDone) and done.worker == 3 and done.item_id == item.item_id
    return list(done.outcomes)


def test_an_item_is_answered_per_image_in_one_message(pipeline: VisionPipeline, shm: Path) -> None:
    current = multiprocessing.get_context("spawn").RawValue("q", 0)
    item = dataclasses.replace(write_batch(shm / "batch", BLOBS), submitted=time.monotonic() - 0.5)
    outcomes = run_item(pipeline, item, current)
    assert current.value == item.item_id, "the pool learns which item a dead worker held from here"
    assert all(isinstance(o, ImageOutcome) and o.batch_id == "b1" for o in outcomes)
    assert sorted((o.index, o.code) for o in outcomes) == [
        (0, Code.OK),
        (1, Code.INVALID_ARGUMENT),
        (2, Code.OK),
    ]
    ok = [o for o in outcomes if o.code == Code.OK]
    assert all(o.worker == 3 and dict(o.timings_ms)["read"] >= 0 for o in ok)
    assert all(dict(o.timings_ms)["queue"] >= 500.0 for o in ok), "time since submission, as the worker saw it"


def test_work_past_its_deadline_is_answered_without_running(pipeline: VisionPipeline, shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS, deadline_s=-1.0)
    outcomes = run_item(pipeline, item)
    assert [(o.index, o.code, o.message) for o in outcomes] == [
        (i, Code.DEADLINE_EXCEEDED, f"image {i}: deadline exceeded before processing") for i in range(3)
    ]


def test_a_file_unlinked_after_validation_is_still_read(pipeline: VisionPipeline, shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    (shm / "batch").unlink()  # a client that cleans up early loses nothing: the front holds the file
    outcomes = run_item(pipeline, item)
    assert sorted((o.index, o.code) for o in outcomes) == [(0, Code.OK), (1, Code.INVALID_ARGUMENT), (2, Code.OK)]


def test_a_batch_the_front_let_go_of_is_data_loss(pipeline: VisionPipeline, shm: Path) -> None:
    item = write_batch(shm / "batch", BLOBS)
    os.close(HELD.pop())
    outcomes = run_item(pipeline, item)  # its number closed, or already reused (by run_item's pipe)
    assert len({(o.code, o.message.split(": ", 1)[1]) for o in outcomes}) == 1
    assert outcomes[0].code == Code.DATA_LOSS and outcomes[0].message.split(": ", 1)[1] in (
        "batch data is no longer available", "batch data changed after it was accepted"
    )


def test_a_pipeline_failure_answers_internal_without_details(model_repo_dir: Path, shm: Path) -> None:
    broken = VisionPipeline.load(model_repo_dir, worker_options(batch_size=4))
    broken.close()  # its engines now refuse to run: a real failure inside the chunk
    outcomes = run_item(broken, write_batch(shm / "batch", BLOBS))
    assert sorted((o.index, o.code, o.message) for o in outcomes) == [
        (0, Code.INTERNAL, "image 0: pipeline error"),
        (1, Code.INVALID_ARGUMENT, "image 1: not a JPEG or PNG"),
        (2, Code.INTERNAL, "image 2: pipeline error"),
    ]


class OutOfMemory:
    """A pipeline whose allocation fails, as DALI's does past RLIMIT_DATA (std::bad_alloc)."""

    models: tuple[tuple[str, str], ...] = (("detector", "1"),)

    def process(self, *args: Any) -> list[ImageOutcome]:
        raise RuntimeError("Critical error in pipeline: std::bad_alloc. Current pipeline object is no longer valid.")


def test_a_pipeline_left_unusable_leaves_the_chunk_to_a_fresh_worker(shm: Path) -> None:
    """After a failed allocation DALI refuses all further work: the worker answers nothing and
    exits, so the pool retries the images one by one on a fresh worker."""
    inbox, pool_end = multiprocessing.Pipe(duplex=False)
    results, parent = multiprocessing.Pipe(duplex=False)
    pool_end.send(dataclasses.replace(write_batch(shm / "batch", BLOBS), item_id=1))
    pool_end.send(dataclasses.replace(write_batch(shm / "batch2", BLOBS), item_id=2))
    current = multiprocessing.get_context("spawn").RawValue("q", 0)
    code = StageWorker(3, OutOfMemory(), parent, current, reader()).serve(inbox, multiprocessing.Event())  # type: ignore[arg-type]
    assert code == FAILED_EXIT
    assert not results.poll(), "nothing answered"
    # The pool counts the chunks up to ``current`` as started (processes.report_death): the second,
    # read from the pipe with the first but never taken, goes to another worker as it came.
    assert current.value == 1, "the second chunk was not taken"


def test_serve_stops_at_the_marker(pipeline: VisionPipeline, shm: Path) -> None:
    inbox, pool_end = multiprocessing.Pipe(duplex=False)
    pool_end.send(write_batch(shm / "batch", BLOBS[:1]))
    pool_end.send(STOP)
    pool_end.send(write_batch(shm / "never", BLOBS[:1], batch_id="never"))
    parent, child = multiprocessing.Pipe(duplex=False)
    StageWorker(3, pipeline, child, reader=reader()).serve(inbox, multiprocessing.Event())
    messages = []
    while parent.poll():
        messages.append(loads(parent.recv_bytes()))
    # Read from the pipe with the others (a pipeful per read), the chunk after the marker never runs.
    assert [[[o.batch_id for o in d.outcomes] for d in m] for m in messages] == [[["b1"]]]


def test_serve_stops_when_the_pool_closes_the_inbox(pipeline: VisionPipeline, shm: Path) -> None:
    inbox, pool_end = multiprocessing.Pipe(duplex=False)
    pool_end.send(write_batch(shm / "batch", BLOBS[:1]))
    pool_end.close()
    parent, child = multiprocessing.Pipe(duplex=False)
    StageWorker(3, pipeline, child, reader=reader()).serve(inbox, multiprocessing.Event())
    (done,) = loads(parent.recv_bytes())
    assert isinstance(done, ItemDone) and not parent.poll()


def test_the_resident_size_is_read_afresh_from_the_held_file() -> None:
    from infer_server.stage.worker import resident_mib

    before = resident_mib()
    grown = bytearray(64 << 20)  # touched: resident
    grown[:: 4096] = b"x" * len(grown[:: 4096])
    assert resident_mib() >= before + 60, "the same held file, read again, shows the growth"
    del grown
