"""The staging tiers' bookkeeping: a staged batch moved to disk keeps its bytes and frees the tmpfs,
the per-tier accounting is recounted from what the front holds, and released files on tmpfs are
rewritten for later batches (spares), bounded, never while over the mark."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_server.front.handoff import STAGE_ON_LOOP_BYTES, Handoff, HandoffLimits
from infer_server.front.staging import SPARE_BYTES, SPARE_FILES, TAG
from infer_server.messages import ImageRef, WorkItem
from infer_server.stage.reader import ChunkReader
from tests.helpers import on_small_tmpfs

LIMITS = HandoffLimits(max_images=8, max_bytes=1 << 20, max_name_bytes=64, max_path_bytes=256)


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[tuple[Handoff, Path, Path]]:
    shm = Path(tempfile.mkdtemp(prefix="infer-tiers-", dir="/dev/shm"))
    handoff = Handoff(shm / "root", shm / "root" / ".server", LIMITS, spill=tmp_path / "spill", spill_at=0.0)
    handoff.prepare_dirs()
    yield handoff, shm / "root" / ".server", tmp_path / "spill"
    handoff.remove_staging_dir()
    shutil.rmtree(shm, ignore_errors=True)


def test_a_demoted_batch_has_the_same_bytes_on_disk_and_leaves_the_tmpfs(tiers: tuple[Handoff, Path, Path]) -> None:
    handoff, staging, spill = tiers
    data = os.urandom(300_000)  # more than one sendfile round on some kernels
    images = (ImageRef(0, 0, 100_000), ImageRef(1, 100_000, 200_000))
    handoff.spill_at = 1.0  # not over the mark: staged in tmpfs
    staged = handoff.stage_inline(data, images)
    size = TAG + 300_000
    assert staged.tier == 0 and handoff.staged_bytes == [size, 0]
    handoff.spill_at = 0.0
    assert handoff.over_mark()
    moved = handoff.demote(staged)
    assert moved.tier == 1 and moved.images == staged.images and Path(moved.path).parent == spill
    assert os.pread(moved.file.fd, size + 1, 0) == staged.file.tag + data and moved.file.tag == staged.file.tag
    assert handoff.staged_bytes == [size, size], "both held until the swap"
    handoff.release(staged)
    assert os.listdir(staging) == [] and handoff.staged_bytes == [0, size]
    handoff.release(moved)
    assert os.listdir(spill) == [] and handoff.staged_bytes == [0, 0]


def test_the_accounting_is_recounted_from_the_files_held(tiers: tuple[Handoff, Path, Path]) -> None:
    handoff, _, _ = tiers
    handoff.stage_inline(b"x" * 1000, (ImageRef(0, 0, 1000),))
    handoff.staged_bytes[1] += 12345  # a sum gone wrong
    assert handoff.recount() == [0, TAG + 13345]
    assert handoff.staged_bytes == [0, TAG + 1000], "spill_at 0: staged on disk"


def test_no_spill_directory_no_demotion(tmp_path: Path) -> None:
    shm = Path(tempfile.mkdtemp(prefix="infer-tiers-", dir="/dev/shm"))
    try:
        handoff = Handoff(shm / "root", shm / "root" / ".server", LIMITS, spill_at=0.0)
        handoff.prepare_dirs()
        assert not handoff.over_mark()
        handoff.remove_staging_dir()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_a_released_batch_is_not_copied(tiers: tuple[Handoff, Path, Path]) -> None:
    """Its descriptor's number may already name another batch's file: the copy would take those bytes."""
    handoff, _, spill = tiers
    staged = handoff.stage_inline(b"x" * 100, (ImageRef(0, 0, 100),))
    handoff.release(staged)
    with pytest.raises(FileNotFoundError):
        handoff.demote(staged)
    assert os.listdir(spill) == []


def test_small_inline_data_is_staged_on_the_loop_only_where_that_cannot_wait(
    tiers: tuple[Handoff, Path, Path],
) -> None:
    """On the loop: into the staging directory on tmpfs, under its mark, small data; anything else
    (the disk tier, a tmpfs over the mark, large data) is left to a thread (None)."""
    handoff, staging, _ = tiers
    image = (ImageRef(0, 0, 1000),)
    handoff.spill_at = 1.0
    staged = handoff.stage_on_loop(b"x" * 1000, image)
    assert staged is not None and staged.tier == 0 and Path(staged.path).parent == staging
    assert handoff.stage_on_loop(b"x" * (STAGE_ON_LOOP_BYTES + 1), image) is None
    handoff.spill_at = 0.0  # over the mark: the next copy goes to disk, which may wait
    assert handoff.stage_on_loop(b"x" * 1000, image) is None
    assert handoff.staged_bytes == [TAG + 1000, 0], "only the first was staged"


def test_staging_on_disk_is_never_done_on_the_loop(tmp_path: Path) -> None:
    handoff = Handoff(tmp_path / "root", tmp_path / "staging", LIMITS)  # /tmp: a disk here
    handoff.prepare_dirs()
    try:
        assert not handoff.tiers[0].in_memory
        assert handoff.stage_on_loop(b"x" * 10, (ImageRef(0, 0, 10),)) is None
        assert handoff.stage_inline(b"x" * 10, (ImageRef(0, 0, 10),)) is not None
    finally:
        handoff.remove_staging_dir()


def test_staged_files_get_distinct_names_from_any_thread(tiers: tuple[Handoff, Path, Path]) -> None:
    handoff, staging, _ = tiers
    handoff.spill_at = 1.0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        staged = list(pool.map(lambda _: handoff.stage_inline(b"y" * 10, ()), range(200)))
    assert len({s.path for s in staged}) == 200 and len(os.listdir(staging)) == 200
    for s in staged:
        handoff.release(s)


def test_a_released_staging_file_is_rewritten_to_exactly_the_next_batch(tiers: tuple[Handoff, Path, Path]) -> None:
    """Its pages are reused: the same file, holding exactly the new bytes (cut when smaller, grown
    when larger), nothing of the batch before it."""
    handoff, staging, _ = tiers
    handoff.spill_at = 1.0
    first = handoff.stage_on_loop(b"a" * 3000, (ImageRef(0, 0, 3000),))
    assert first is not None
    handoff.release(first)
    assert os.listdir(staging) == [os.path.basename(first.path)] and handoff.staged_bytes == [0, 0]
    for data in (b"b" * 1000, os.urandom(5000)):
        again = handoff.stage_on_loop(data, (ImageRef(0, 0, len(data)),))
        assert again is not None and (again.path, again.file.ino) == (first.path, first.file.ino)
        assert again.file.size == TAG + len(data) == os.fstat(again.file.fd).st_size
        assert os.pread(again.file.fd, 10_000, 0) == again.file.tag + data and again.file.tag != first.file.tag
        assert handoff.staged_bytes == [TAG + len(data), 0]
        handoff.release(again)
    handoff.release(again)  # a second release of the same batch: the spare stays
    assert len(os.listdir(staging)) == 1


def test_spares_are_few_and_small(tiers: tuple[Handoff, Path, Path]) -> None:
    handoff, staging, _ = tiers
    handoff.spill_at = 1.0
    batches = [handoff.stage_inline(b"c" * 100, (ImageRef(0, 0, 100),)) for _ in range(SPARE_FILES + 3)]
    large = handoff.stage_inline(b"d" * (SPARE_BYTES + 1), (ImageRef(0, 0, SPARE_BYTES + 1),))
    for batch in [*batches, large]:
        handoff.release(batch)
    assert len(os.listdir(staging)) == SPARE_FILES, "the rest deleted, the large one too"
    fds = len(os.listdir("/proc/self/fd"))
    handoff.remove_staging_dir()
    assert len(os.listdir("/proc/self/fd")) <= fds - SPARE_FILES and not staging.exists()


def test_no_spare_is_kept_over_the_mark(tiers: tuple[Handoff, Path, Path]) -> None:
    """Spilling frees the tmpfs: a file released while it is over --spill-at is deleted, and the
    spares kept before go when upkeep finds it over the mark."""
    handoff, staging, _ = tiers
    handoff.spill_at = 1.0
    kept, batch = (handoff.stage_inline(b"e" * 100, (ImageRef(0, 0, 100),)) for _ in range(2))
    handoff.release(kept)
    handoff.spill_at = 0.0
    handoff.release(batch)
    assert os.listdir(staging) == [os.path.basename(kept.path)] and handoff.tiers[0].spares == 1
    handoff.tiers[0].drop_spares()  # what upkeep does while staging is over the mark
    assert os.listdir(staging) == [] and handoff.tiers[0].spares == 0


def test_without_a_spill_directory_no_spare_is_kept_over_the_mark() -> None:
    shm = Path(tempfile.mkdtemp(prefix="infer-tiers-", dir="/dev/shm"))
    try:
        handoff = Handoff(shm / "root", shm / "root" / ".server", LIMITS, spill_at=0.0)
        handoff.prepare_dirs()
        handoff.release(handoff.stage_inline(b"e" * 100, (ImageRef(0, 0, 100),)))
        assert os.listdir(shm / "root" / ".server") == []
        handoff.remove_staging_dir()
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def test_the_orphan_sweep_leaves_spares_alone(tiers: tuple[Handoff, Path, Path]) -> None:
    handoff, staging, _ = tiers
    handoff.spill_at = 1.0
    batch = handoff.stage_inline(b"f" * 100, (ImageRef(0, 0, 100),))
    handoff.release(batch)
    os.utime(batch.path, (0, 0))  # old enough for any sweep
    assert handoff.sweep(1.0) == 0 and os.listdir(staging) == [os.path.basename(batch.path)]
    again = handoff.stage_inline(b"g" * 100, (ImageRef(0, 0, 100),))
    assert again.path == batch.path


_SPARE_ON_FULL_TMPFS = """
from infer_server.front.errors import Overloaded
from infer_server.front.handoff import Handoff, HandoffLimits
from infer_server.messages import ImageRef
shm = sys.argv[1]
handoff = Handoff(shm + "/root", shm + "/staging", HandoffLimits(8, 4 << 20, 64, 256))
handoff.prepare_dirs()
handoff.release(handoff.stage_inline(b"a" * 1000, (ImageRef(0, 0, 1000),)))
with open(shm + "/filler", "wb", buffering=0) as f:  # someone else fills the file system
    try:
        while True:
            f.write(b"f" * 4096)
    except OSError:
        pass
try:
    handoff.stage_inline(b"b" * 800_000, (ImageRef(0, 0, 800_000),))
except Overloaded as exc:
    print("overloaded", exc)
print("left", os.listdir(shm + "/staging"), handoff.staged_bytes)
"""


def test_a_spare_that_cannot_grow_is_dropped_and_the_push_told_to_retry(tmp_path: Path) -> None:
    """Out of space rewriting a spare: no half-written file stays, and the push is answered
    RESOURCE_EXHAUSTED (retry later) as for a fresh file."""
    done = on_small_tmpfs(tmp_path, "import os, sys\n" + _SPARE_ON_FULL_TMPFS, "size=2m")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "overloaded the server's shared directory is full; retry later" in done.stdout, done.stdout
    assert "left [] [0]" in done.stdout, done.stdout


def test_a_chunk_of_a_released_batch_never_reads_the_next_batch_in_its_file(tiers: tuple[Handoff, Path, Path]) -> None:
    """A batch the registry answered overdue is released while a worker may still hold one of its
    chunks; its file, rewritten for the next inline batch (same descriptor, inode and size), is
    refused by the worker's check, not read as that chunk's image."""
    handoff, _, _ = tiers
    handoff.spill_at = 1.0
    first = handoff.stage_on_loop(b"A" * 4096, (ImageRef(0, 0, 4096),))
    assert first is not None
    stale = WorkItem(1, "first", first.file, first.images, deadline=1e12)
    assert ChunkReader(owner=os.getpid()).read(stale)[0] == b"A" * 4096
    handoff.release(first)
    second = handoff.stage_on_loop(b"B" * 4096, (ImageRef(0, 0, 4096),))
    assert second is not None and (second.file.fd, second.file.ino, second.file.size) == (
        first.file.fd, first.file.ino, first.file.size)
    assert ChunkReader(owner=os.getpid()).read(stale) == ["image 0: batch data changed after it was accepted"]
    fresh = WorkItem(2, "second", second.file, second.images, deadline=1e12)
    assert ChunkReader(owner=os.getpid()).read(fresh)[0] == b"B" * 4096
