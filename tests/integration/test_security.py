"""Attacks on the handoff by another user of the host, on real tmpfs files (docs/security.md).

Each test is one finding of the adversarial review: a shared directory someone else owns or may
rename things in, a staging directory swapped for a symlink, and a batch file or one of its
directories swapped after the front validated it (a FIFO, a symlink to elsewhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_server.front.handoff import BatchFile, Handoff, HandoffLimits
from infer_server.messages import WorkItem
from infer_server.stage.worker import ChunkReader
from tests.helpers import on_small_tmpfs

NOBODY = 65534
BLOBS = [b"\xff\xd8first image", b"\xff\xd8second"]


@pytest.fixture
def shm() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="infer-sec-", dir="/dev/shm"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def handoff_for(root: Path) -> Handoff:
    return Handoff(root, root / ".server", HandoffLimits(8, 1 << 20, 64, 256))


def started(root: Path) -> Handoff:
    handoff = handoff_for(root)
    handoff.prepare_dirs()
    return handoff


def as_root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")


def test_a_shared_directory_another_user_owns_is_refused(shm: Path) -> None:
    as_root_only()
    root = shm / "infer"
    root.mkdir(mode=0o1777)
    os.chown(root, NOBODY, NOBODY)  # created by someone else before the server first started
    with pytest.raises(RuntimeError, match=r"belongs to uid 65534, not to this server's user .*Remove it"):
        handoff_for(root).prepare_dirs()
    assert not (root / ".server").exists(), "nothing is created in it"


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_shared_directory_others_may_rename_in_is_refused(shm: Path, mode: int) -> None:
    root = shm / "infer"
    root.mkdir()
    os.chmod(root, mode)
    with pytest.raises(RuntimeError, match=r"without the sticky bit.*chmod \+t"):
        handoff_for(root).prepare_dirs()


def test_a_shared_directory_with_the_sticky_bit_is_fine(shm: Path) -> None:
    root = shm / "infer"
    root.mkdir()
    os.chmod(root, 0o1777)
    started(root).remove_staging_dir()


def test_a_staging_directory_that_is_a_symlink_is_refused(shm: Path) -> None:
    root, elsewhere = shm / "infer", shm / "elsewhere"
    root.mkdir(mode=0o700)
    elsewhere.mkdir(mode=0o700)
    (root / ".server").symlink_to(elsewhere)
    with pytest.raises(RuntimeError, match="not a directory"):
        handoff_for(root).prepare_dirs()


def test_staging_swapped_for_a_symlink_redirects_nothing(shm: Path) -> None:
    """The server's own creates, sweeps and deletes stay in the directory it created."""
    root, victim = shm / "infer", shm / "victim"
    victim.mkdir()
    (victim / "precious").write_bytes(b"keep me")
    os.utime(victim / "precious", (0, 0))  # older than any janitor TTL
    handoff = started(root)
    os.rename(root / ".server", root / ".server-moved")
    (root / ".server").symlink_to(victim)  # what a user who could write to the root would do

    staged = handoff.stage_inline(b"".join(BLOBS), ())
    assert sorted(os.listdir(victim)) == ["precious"], "inline data is not written through the symlink"
    assert os.path.basename(staged.path) in os.listdir(root / ".server-moved")
    handoff.sweep(0.0)
    handoff.release(staged)
    handoff.remove_staging_dir()
    assert (victim / "precious").read_bytes() == b"keep me", "neither the janitor nor a clean stop deletes it"
    assert (root / ".server").is_symlink(), "the symlink is not what the server created: left alone"


def test_a_server_on_a_directory_it_cannot_trust_says_why_and_exits(shm: Path, model_repo_dir: Path) -> None:
    root = shm / "infer"
    root.mkdir()
    os.chmod(root, 0o777)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
    done = subprocess.run(
        [sys.executable, "-m", "infer_server", "serve", "--models", str(model_repo_dir), "--port", "0",
         "--shm-dir", str(root)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and "listening on" not in done.stdout
    assert "without the sticky bit" in done.stderr and "Traceback" not in done.stderr


def validated(handoff: Handoff, root: Path, relative: str) -> BatchFile:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(BLOBS))
    os.chmod(path, 0o600)
    return handoff.open_client_file(relative, (), path.stat().st_size, {os.geteuid()})


def read_within(item: WorkItem, seconds: float = 10.0) -> list[bytes]:
    """What a worker reads for ``item`` (this process plays the front), or fail if it hangs."""
    got: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: got.append(ChunkReader(owner=os.getpid()).read(item)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert got, "the worker hung on what was swapped in"
    return [bytes(b) for b in got[0]]


def item_of(batch: BatchFile) -> WorkItem:
    from infer_server.messages import ImageRef

    refs = (ImageRef(0, 0, len(BLOBS[0])), ImageRef(1, len(BLOBS[0]), len(BLOBS[1])))
    return WorkItem(1, "b", batch.file, refs, time.monotonic() + 60)


def test_a_fifo_swapped_in_after_validation_does_not_hang_the_worker(shm: Path) -> None:
    root = shm / "infer"
    handoff = started(root)
    batch = validated(handoff, root, "batch")
    os.mkfifo(root / "fifo")
    os.rename(root / "fifo", root / "batch")  # no writer will ever come
    assert read_within(item_of(batch)) == BLOBS, "the validated file is read, not the FIFO"
    handoff.release(batch)
    handoff.remove_staging_dir()


def test_a_directory_swapped_for_a_symlink_after_validation_is_not_followed(shm: Path) -> None:
    root, elsewhere = shm / "infer", shm / "elsewhere"
    handoff = started(root)
    batch = validated(handoff, root, "d/batch")
    elsewhere.mkdir()
    os.mkfifo(elsewhere / "batch")
    os.rename(root / "d", root / "d-old")
    (root / "d").symlink_to(elsewhere)
    assert read_within(item_of(batch)) == BLOBS
    handoff.release(batch)
    handoff.remove_staging_dir()


_FULL_STAGING = """
import sys
from pathlib import Path
from infer_server.front.handoff import Handoff, HandoffLimits
from infer_server.front.errors import ServerError
root = Path(sys.argv[1])
handoff = Handoff(root, root / ".server", HandoffLimits(8, 1 << 23, 64, 256))
handoff.prepare_dirs()
try:
    handoff.stage_inline(b"x" * 3_000_000, ())
except ServerError as exc:
    print(exc.code.name, exc.message, sorted(p.name for p in (root / ".server").iterdir()))
"""


def test_a_full_shared_directory_is_retry_later_not_internal(tmp_path: Path) -> None:
    """Finding: inline data on a full tmpfs came back as INTERNAL with a logged traceback."""
    done = on_small_tmpfs(tmp_path, _FULL_STAGING, "size=2m,mode=1777")
    assert done.stdout.strip() == "RESOURCE_EXHAUSTED the server's shared directory is full; retry later []"
