"""The client's shared request builder: transport choice, tmpfs batch files and their ownership."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_client import _batch_files
from infer_client._protocol import (
    INLINE_FALLBACK_BYTES,
    BatchFiles,
    PushedBatches,
    is_local_target,
    prepare_push,
    resolve_transport,
)


@pytest.fixture
def shm() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="infer-client-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("localhost:8001", True),
        ("127.0.0.1:8001", True),
        ("127.3.4.5:1", True),
        ("[::1]:8001", True),
        ("::1", True),
        ("unix:/run/infer.sock", True),
        ("dns:///localhost:8001", True),
        ("ipv4:127.0.0.1:8001", True),
        ("10.0.0.7:8001", False),
        ("infer.example.com:443", False),
        ("[2001:db8::1]:8001", False),
    ],
)
def test_local_targets(target: str, local: bool) -> None:
    assert is_local_target(target) is local


def test_auto_transport_needs_a_local_target_and_a_writable_directory(shm: Path) -> None:
    assert resolve_transport("auto", "localhost:1", shm) == "tmpfs"
    assert resolve_transport("auto", "10.0.0.7:1", shm) == "inline"
    assert resolve_transport("auto", "localhost:1", shm / "missing") == "inline"
    assert resolve_transport("inline", "localhost:1", shm) == "inline"


def test_tmpfs_push_writes_one_private_file_back_to_back(shm: Path, tmp_path: Path) -> None:
    src = tmp_path / "b.jpg"
    src.write_bytes(b"BBBB")
    prepared = prepare_push([b"AA", src], None, "rid", "tmpfs", BatchFiles(shm))
    request = prepared.request
    assert prepared.owned_path == request.path and Path(request.path).parent == shm
    assert Path(request.path).read_bytes() == b"AABBBB" and list(request.sizes) == [2, 4]
    assert list(request.names) == ["", "b.jpg"] and request.request_id == "rid" and not request.data
    assert os.stat(request.path).st_mode & 0o777 == 0o600
    assert os.listdir(shm) == [os.path.basename(request.path)]  # no temp file left behind


def test_inline_push_carries_the_bytes(tmp_path: Path) -> None:
    files = BatchFiles(tmp_path)
    prepared = prepare_push([b"AA", b"CCC"], ["a", "c"], None, "inline", files)
    assert prepared.owned_path is None and prepared.request.data == b"AACCC"
    assert list(prepared.request.sizes) == [2, 3] and not prepared.request.path
    with pytest.raises(ValueError):
        prepare_push([], None, None, "inline", files)
    with pytest.raises(ValueError):
        prepare_push([b"A"], ["a", "b"], None, "inline", files)
    assert os.listdir(tmp_path) == []


def test_a_push_whose_images_are_all_unnamed_sends_no_names(tmp_path: Path) -> None:
    """No names and one empty name per image mean the same to the server; none is less to send and read."""
    files = BatchFiles(tmp_path)
    assert list(prepare_push([b"AA", b"C"], None, None, "inline", files).request.names) == []
    assert list(prepare_push([b"AA", b"C"], ["", ""], None, "inline", files).request.names) == []
    assert list(prepare_push([b"AA", b"C"], ["", "c"], None, "inline", files).request.names) == ["", "c"]


def test_batch_file_is_freed_when_its_last_result_arrives(shm: Path) -> None:
    files = BatchFiles(shm, keep=1)
    pushed = PushedBatches(files)
    first, retry, other = (Path(files.write([b"x"])[0]) for _ in range(3))
    pushed.add("b1", str(first), 2)
    pushed.add("b1", str(retry), 2)  # a retried request_id: the server reads the first file
    pushed.add("b2", str(other), 1)
    assert not retry.exists()  # the server may read either file: deleted, never rewritten
    assert pushed.accept("b1", 1)
    assert not pushed.accept("b1", 1)  # handed out again after a cancelled write: dropped
    assert pushed.accept("b1", 0)
    assert first.exists()  # done: kept for the next batch (keep=1)
    third = Path(files.write([b"y"])[0])
    fourth = Path(files.write([b"z"])[0])
    assert third == first and fourth not in (first, other)  # the free file first, then a new one
    pushed.add("b3", str(third), 1)
    pushed.add("b4", str(fourth), 1)
    assert pushed.accept("b3", 0) and pushed.accept("b4", 0)
    assert third.exists() and not fourth.exists()  # done too, but the free list is full: deleted
    foreign = shm / "foreign"
    foreign.write_bytes(b"x")
    pushed.add("b5", str(foreign), 1)
    assert pushed.accept("b5", 0) and not foreign.exists()  # not written here: never rewritten
    assert pushed.accept("unknown", 0)
    pushed.remove_all()  # owned (b2's) and free files alike
    assert os.listdir(shm) == []


def test_a_done_batch_file_is_rewritten_in_place_for_the_next_batch(shm: Path, tmp_path: Path) -> None:
    files = BatchFiles(shm)
    path, sizes = files.write([b"A" * 5000, b"B" * 3000])
    ino = os.stat(path).st_ino
    files.recycle(path)
    src = tmp_path / "c.jpg"
    src.write_bytes(b"CC")
    again, sizes = files.write([b"D", src])
    assert again == path and os.stat(again).st_ino == ino and sizes == [1, 2]
    assert Path(again).read_bytes() == b"DCC"  # truncated to the new batch, nothing of the old
    assert os.stat(again).st_mode & 0o777 == 0o600
    files.recycle(again)
    os.chmod(again, 0o644)  # not the private file the client left: not written, a new file instead
    other, _ = files.write([b"F"])
    assert other != again and Path(again).read_bytes() == b"DCC"
    files.recycle(other)
    os.unlink(again)
    os.unlink(other)  # removed behind the client's back: a new file is made instead
    third, _ = files.write([b"E"])
    assert third not in (again, other) and Path(third).read_bytes() == b"E"
    assert os.listdir(shm) == [os.path.basename(third)]
    files.recycle(third)
    files.remove_all()
    assert os.listdir(shm) == []


def test_a_reused_batch_file_takes_any_size_and_leaves_no_descriptor_open(shm: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    files = BatchFiles(shm, keep=2)
    big = bytes(range(256)) * 6000  # 1.5 MB: past the first mapping of the file
    path, _ = files.write([b"A" * 3000])
    pages = ([b"J" * 5000], [b"K" * 4000, b"L" * 5000], [b"M" * 4096], [b"N" * 3, b"O" * 12286])  # across page ends
    for batch in ([b"B" * 10, b"C" * 20], [big, b"D"], [b""], [b"E"], [b"G"], [big, big], [b"H" * 30], [b"I" * 30],
                  *pages, [big], *pages):  # fmt: skip
        files.recycle(path)
        again, sizes = files.write(batch)
        assert again == path and sizes == [len(b) for b in batch]
        assert Path(path).read_bytes() == b"".join(batch)  # exactly this batch: size == sum(sizes)
    files.discard(path)  # a failed push: deleted, never rewritten
    assert not Path(path).exists()
    kept, _ = files.write([b"F"])
    files.recycle(kept)
    files.remove_all()
    assert os.listdir(shm) == [] and len(os.listdir("/proc/self/fd")) == fds


def test_a_batch_of_more_images_than_one_write_takes_is_written_whole(shm: Path) -> None:
    """pwritev takes at most IOV_MAX (1024) buffers: a larger batch is written in several."""
    many = [bytes([i % 251]) * (1 + i % 7) for i in range(2500)]
    files = BatchFiles(shm, keep=1)
    first, _ = files.write([b"A"])
    files.recycle(first)
    grown, sizes = files.write(many)  # mapped: its first byte copied, the rest written
    assert grown == first and Path(grown).read_bytes() == b"".join(many) and sizes == [len(b) for b in many]
    others = [files.write([b"B"])[0] for _ in range(3)]  # new files: the last two hold no descriptor
    for path in reversed(others):
        files.recycle(path)  # the first one back is kept free (keep=1), the others deleted
    unmapped, _ = files.write(many)  # rewritten through a descriptor opened for it
    assert unmapped == others[2] and Path(unmapped).read_bytes() == b"".join(many)
    files.remove_all()


class _CheckedMap(mmap.mmap):
    """A mapping that fails a copy into it past the file's end or into a page the file does not
    have (a hole): either is SIGBUS on a full tmpfs, where a test cannot safely go."""

    def __new__(cls, fd: int, length: int, *args: int) -> _CheckedMap:
        mapped = super().__new__(cls, fd, length, *args)
        mapped.fd = fd
        return mapped

    def __setitem__(self, key, value) -> None:  # type: ignore[no-untyped-def]
        if isinstance(key, slice) and key.stop > key.start:
            assert key.stop <= os.fstat(self.fd).st_size, ("a copy past the end", key, os.fstat(self.fd).st_size)
            for page in range(key.start // mmap.PAGESIZE * mmap.PAGESIZE, key.stop, mmap.PAGESIZE):
                assert os.lseek(self.fd, page, os.SEEK_DATA) == page, ("a copy into a hole", key, page)
        super().__setitem__(key, value)


def test_a_batch_file_is_copied_into_only_where_it_has_pages(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mmap, "mmap", _CheckedMap)
    files = BatchFiles(shm, keep=1)
    path, _ = files.write([b"A" * 100])
    big = bytes(range(256)) * 5000  # 1.28 MB: past the first mapping
    for batch in ([b"B" * 5000], [b"C" * 4000, b"D" * 9000], [b"E" * 3], [big], [b"F" * 4096, b""], [big, big],
                  [b"G" * 12289], [b""], [b"H" * 8191, b"I" * 2]):  # fmt: skip
        files.recycle(path)
        again, _ = files.write(batch)
        assert again == path and Path(path).read_bytes() == b"".join(batch)
    files.remove_all()


def test_a_short_write_carries_on_from_where_it_stopped(shm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux writes at most about 2 GiB per call, without an error: the rest follows."""
    pwritev = os.pwritev

    def at_most_1000_bytes(fd: int, buffers: list[memoryview], offset: int) -> int:
        taken, room = [], 1000
        for buffer in buffers:
            taken.append(buffer[:room])
            room -= len(taken[-1])
        return pwritev(fd, [t for t in taken if len(t)], offset)

    monkeypatch.setattr(_batch_files.os, "pwritev", at_most_1000_bytes)
    files = BatchFiles(shm, keep=1)
    path, _ = files.write([b"A"])
    files.recycle(path)
    batch = [bytes([i]) * (300 + 97 * i) for i in range(40)]
    again, _ = files.write(batch)
    assert again == path and Path(path).read_bytes() == b"".join(batch)
    files.remove_all()


def test_batch_files_hold_a_bounded_number_of_descriptors(shm: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    files = BatchFiles(shm, keep=1)  # at most 2 files hold a descriptor
    paths = [files.write([bytes([i]) * 100])[0] for i in range(5)]  # five batches in flight
    assert len(os.listdir("/proc/self/fd")) == fds + 2
    files.recycle(paths[0])
    files.write([b"mapped"])  # rewritten through a mapping, which holds a descriptor of its own
    assert len(os.listdir("/proc/self/fd")) == fds + 3
    files.recycle(paths[0])
    files.write([b"again"])
    assert len(os.listdir("/proc/self/fd")) == fds + 3  # the mapping is kept, not made again
    for path in paths[2:]:
        files.recycle(path)  # an unmapped file in the free list (keep=1), the rest deleted
    again, _ = files.write([b"X" * 7, b"Y"])  # rewritten through a descriptor opened for it
    assert again == paths[2] and Path(again).read_bytes() == b"X" * 7 + b"Y"
    assert len(os.listdir("/proc/self/fd")) == fds + 3
    files.remove_all()
    assert os.listdir(shm) == [] and len(os.listdir("/proc/self/fd")) == fds


def test_an_image_that_cannot_be_read_leaves_the_free_file_free(shm: Path) -> None:
    files = BatchFiles(shm)
    path, _ = files.write([b"A"])
    files.recycle(path)
    with pytest.raises(FileNotFoundError):
        files.write([b"B", shm / "missing.jpg"])
    again, _ = files.write([b"C"])
    assert again == path and Path(path).read_bytes() == b"C"
    files.discard(again)
    files.remove_all()
    assert os.listdir(shm) == []


class FullFiles(BatchFiles):
    """Batch files on a file system with no room left."""

    def write(self, images):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_tmpfs_sends_the_batch_inline_unless_it_is_too_large_for_one_message(tmp_path: Path) -> None:
    files = FullFiles(tmp_path)
    small = prepare_push([b"x" * 10], None, None, "tmpfs", files)
    assert (small.request.data, small.owned_path, files.inline_fallbacks) == (b"x" * 10, None, 1)
    with pytest.raises(OSError) as info:
        prepare_push([b"x" * (INLINE_FALLBACK_BYTES + 1)], None, None, "tmpfs", files)
    assert info.value.errno == errno.ENOSPC and files.inline_fallbacks == 1
