"""The staging tiers' bookkeeping: a staged batch moved to disk keeps its bytes and frees the tmpfs,
and the per-tier accounting is recounted from what the front holds."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_server.front.handoff import STAGE_ON_LOOP_BYTES, Handoff, HandoffLimits
from infer_server.messages import ImageRef

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
    assert staged.tier == 0 and handoff.staged_bytes == [300_000, 0]
    handoff.spill_at = 0.0
    assert handoff.over_mark()
    moved = handoff.demote(staged)
    assert moved.tier == 1 and moved.images == images and Path(moved.path).parent == spill
    assert os.pread(moved.file.fd, len(data) + 1, 0) == data
    assert handoff.staged_bytes == [300_000, 300_000], "both held until the swap"
    handoff.release(staged)
    assert os.listdir(staging) == [] and handoff.staged_bytes == [0, 300_000]
    handoff.release(moved)
    assert os.listdir(spill) == [] and handoff.staged_bytes == [0, 0]


def test_the_accounting_is_recounted_from_the_files_held(tiers: tuple[Handoff, Path, Path]) -> None:
    handoff, _, _ = tiers
    handoff.stage_inline(b"x" * 1000, (ImageRef(0, 0, 1000),))
    handoff.staged_bytes[1] += 12345  # a sum gone wrong
    assert handoff.recount() == [0, 13345]
    assert handoff.staged_bytes == [0, 1000], "spill_at 0: staged on disk"


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
    assert handoff.staged_bytes == [1000, 0], "only the first was staged"


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
