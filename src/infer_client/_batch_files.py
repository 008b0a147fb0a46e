"""A client's batch files in the shared directory: written once, then rewritten in place.

Used by ``_protocol.prepare_push`` (``BatchFiles.write``) and by the bookkeeping that knows when a
batch is done (``PushedBatches``: ``recycle``) or its push failed (``discard``), in the client
application's process. A new file is created 0600 under a temporary name and renamed into place,
so the server never sees a partial file and nobody else can change it; see ``BatchFiles`` for why
and how a file is reused.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import mmap
import os
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

ImageSource = str | os.PathLike[str] | bytes

log = logging.getLogger(__name__)


def _new_batch_file(images: Sequence[ImageSource], shm_dir: str | os.PathLike[str]) -> tuple[int, str, list[int]]:
    """Write ``images`` back to back into a new 0600 file in ``shm_dir``; returns (its open
    read-write descriptor, path, sizes)."""
    name = uuid.uuid4().hex
    tmp = os.path.join(shm_dir, f".{name}.tmp")
    final = os.path.join(shm_dir, f"{name}.batch")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    sizes = []
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            for img in images:
                if isinstance(img, bytes):
                    out.write(img)
                    sizes.append(len(img))
                else:
                    start = out.tell()
                    with open(img, "rb") as src:
                        shutil.copyfileobj(src, out, 1024 * 1024)
                    sizes.append(out.tell() - start)
        os.rename(tmp, final)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return fd, final, sizes


_MAP_STEP = 1024 * 1024  # a mapping covers the batch rounded up to this, so sizes that vary a little fit


class _BatchFile:
    """One batch file this client wrote: its path and identity, and, while it is one of the client's
    mapped files, its read-write descriptor and a shared mapping (made at its first rewrite)."""

    def __init__(self, fd: int, path: str, keep_open: bool) -> None:
        st = os.fstat(fd)
        self.path, self.dev, self.ino = path, st.st_dev, st.st_ino
        self.fd: int | None = fd
        self.map: mmap.mmap | None = None
        self.allocated = st.st_size  # every byte below this was written: its page exists
        if not keep_open:
            self.close()

    @property
    def mapped(self) -> bool:
        return self.fd is not None

    def size_if_ours(self) -> int | None:
        """The file's size if the path still names this file, private and linked nowhere else
        (checked on the path: it is the path the server opens), else None."""
        try:
            st = os.stat(self.path, follow_symlinks=False)
        except OSError:
            return None
        ours = (st.st_dev, st.st_ino) == (self.dev, self.ino) and st.st_nlink == 1 and not st.st_mode & 0o077
        return st.st_size if ours else None

    def rewrite(self, blobs: Sequence[bytes], size: int) -> bool:
        """Make the file exactly ``blobs``, back to back; False (nothing written) if the path no
        longer opens this file. ``size``: the file's size now (``size_if_ours``).

        What lies on pages the file has already is written through the mapping; from where they
        end, the rest is written with ``pwritev``, which allocates the pages a larger batch needs
        and extends the file. Allocating them up front (``posix_fallocate``) and copying into the
        mapping cost twice as much: the kernel zeroes each new page, then the copy faults each one
        in (docs/grpc-front.md). And a full file system fails the write with ENOSPC, where a copy
        into an unbacked page of the mapping would kill the process with SIGBUS."""
        total = sum(len(b) for b in blobs)
        if self.fd is None:
            return self._write_through(blobs, total)
        if self.map is None or len(self.map) < total:
            size = self._map(-(-max(total, 1) // _MAP_STEP) * _MAP_STEP)  # an empty batch too
        assert self.map is not None
        if size > total:  # cut back first: the pages past the new end are freed
            os.ftruncate(self.fd, total)
            size = total
        mapped_end = min(self.allocated, size)  # within the file, on pages that exist: a copy cannot fault
        offset, mapped = 0, self.map
        rest: list[bytes | memoryview] = []  # what goes past mapped_end, by pwritev
        for blob in blobs:
            end = offset + len(blob)
            if end <= mapped_end:
                mapped[offset:end] = blob
            elif offset < mapped_end:
                view = memoryview(blob)
                mapped[offset:mapped_end] = view[: mapped_end - offset]
                rest.append(view[mapped_end - offset :])
            else:
                rest.append(blob)
            offset = end
        _write_all(self.fd, rest, mapped_end)
        self.allocated = total
        return True

    def _write_through(self, blobs: Sequence[bytes], total: int) -> bool:
        """An unmapped file: write it through a descriptor opened for this batch."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self.dev, self.ino):
                return False
            _write_all(fd, blobs, 0)
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
        return True

    def _map(self, length: int) -> int:
        """Map the file ``length`` bytes long (its size now; ``rewrite`` cuts it back)."""
        assert self.fd is not None
        if self.map is not None:
            self.map.close()
            self.map = None
        os.ftruncate(self.fd, length)  # mmap maps no more than the file holds
        self.allocated = min(self.allocated, length)
        self.map = mmap.mmap(self.fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        return length

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


_IOV_PARTS = 512  # buffers per pwritev: the kernel takes at most IOV_MAX (1024), a batch may hold more
_ROOM_KEPT_S = 0.02  # how long a file system found with room counts as having it (BatchFiles.nearly_full)


def _write_all(fd: int, blobs: Sequence[bytes | memoryview], offset: int) -> None:
    """Write ``blobs`` back to back at ``offset``, in as many ``pwritev`` calls as it takes: one
    takes at most ``_IOV_PARTS`` buffers here and writes at most about 2 GiB (Linux's limit per
    call). A file system that runs out of room writes what fits, then raises ENOSPC (or EDQUOT)."""
    views, k = [memoryview(b) for b in blobs if len(b)], 0
    while k < len(views):
        written = os.pwritev(fd, views[k : k + _IOV_PARTS], offset)
        if written == 0:  # no room and no error: the same as ENOSPC
            raise OSError(errno.ENOSPC, f"no room to write the batch file past {offset} bytes")
        offset += written
        while k < len(views) and written >= len(views[k]):
            written -= len(views[k])
            k += 1
        if written:  # a short write: on from the first byte not written
            views[k] = views[k][written:]


class BatchFiles:
    """This client's batch files in the shared directory, rewritten in place once a batch is done.

    A new tmpfs file costs a page allocation per 4 KiB and deleting it costs as much again;
    rewriting it with ``pwritev`` still costs the file system's work per page; a copy into a mapping
    of pages that exist costs neither (docs/performance.md has the figures). So up to ``2 * keep``
    files stay open and, once rewritten, mapped. Files beyond those (a client with more batches in flight) are rewritten
    with ``pwritev``, so descriptors stay bounded however many batches wait: two per mapped file
    (CPython's ``mmap`` keeps a duplicate), at most ``4 * keep``. The mapping is a client's own
    file, 0600: only a process of the same user that truncates it during a copy could make the
    copy fault (SIGBUS); a copy goes only to pages that exist, the rest is written, so a full file
    system is an ``OSError``. A file is reused only
    after every result of its batch arrived (the server has read every one of its images and holds
    no work on it); after a failed or abandoned push it is deleted instead (``discard``), since the
    server may still read it. Thread-safe.
    """

    def __init__(self, shm_dir: str | os.PathLike[str], keep: int = 8, full_at: float = 0.95) -> None:
        self.shm_dir, self._keep = os.fspath(shm_dir), keep
        self.full_at = full_at  # share of the file system in use above which it counts as full
        self.inline_fallbacks = 0  # pushes sent inline because the shared tmpfs was full
        self._lock = threading.Lock()
        self._room_until = 0.0  # nearly_full: the file system had room when last asked, until then
        self._free: list[_BatchFile] = []
        self._out: dict[str, _BatchFile] = {}  # written, its batch not done yet
        self._mapped = 0  # files holding a descriptor (and a mapping): at most 2 * keep

    def write(self, images: Sequence[ImageSource]) -> tuple[str, list[int]]:
        """Write ``images`` back to back into a free file or a new one; returns (path, sizes)."""
        with self._lock:
            file = self._free.pop() if self._free else None
        if file is not None:
            try:
                blobs = [img if isinstance(img, bytes) else Path(img).read_bytes() for img in images]
            except BaseException:  # e.g. an image path that does not exist: the file stays free
                with self._lock:
                    self._free.append(file)
                raise
            try:
                size = file.size_if_ours()
                rewritten = size is not None and file.rewrite(blobs, size)
            except BaseException:
                self._delete(file)
                raise
            if rewritten:
                with self._lock:
                    self._out[file.path] = file
                return file.path, [len(b) for b in blobs]
            self._forget(file)  # removed or replaced behind our back: leave the path alone, start anew
            images = blobs
        fd, path, sizes = _new_batch_file(images, self.shm_dir)
        with self._lock:
            keep_open = self._mapped < 2 * self._keep
            self._mapped += keep_open
            self._out[path] = _BatchFile(fd, path, keep_open)
        return path, sizes

    def nearly_full(self) -> bool:
        """The shared directory's file system is above ``full_at`` of its blocks (or inodes).

        A file system found with room is taken to have it for ``_ROOM_KEPT_S`` (a ``statvfs`` is
        ~7 µs, 2–3% of a push's CPU in the client): a write that fills it meanwhile fails with
        ENOSPC, which sends the push inline just as a full answer here would (and ``fell_back``
        makes the next push ask again)."""
        if time.monotonic() < self._room_until:
            return False
        try:
            st = os.statvfs(self.shm_dir)
        except OSError:
            return False
        used = 1 - st.f_bavail / st.f_blocks if st.f_blocks else 0.0
        inodes = 1 - st.f_favail / st.f_files if st.f_files else 0.0
        if full := max(used, inodes) > self.full_at:
            return full
        self._room_until = time.monotonic() + _ROOM_KEPT_S
        return False

    def fell_back(self, why: str) -> None:
        """A push went inline instead: counted, and said once per client in the log."""
        self._room_until = 0.0  # the next push asks the file system again
        with self._lock:
            self.inline_fallbacks += 1
            first = self.inline_fallbacks == 1
        if first:
            log.warning("the shared directory %s is full (%s): sending batches inline until it has room "
                        "(said once; InferClient.inline_fallbacks counts them)", self.shm_dir, why)  # fmt: skip

    def recycle(self, path: str | None) -> None:
        """``path``'s batch is done: keep the file for a later batch (or delete it)."""
        if path is None:
            return
        with self._lock:
            file = self._out.pop(path, None)
            if file is not None and len(self._free) < self._keep:
                self._free.append(file)
                return
        if file is None:
            remove_file(path)
        else:
            self._delete(file)

    def discard(self, path: str | None) -> None:
        """Delete ``path`` and never rewrite it: its push failed or was abandoned."""
        if path is None:
            return
        with self._lock:
            file = self._out.pop(path, None)
        if file is None:
            remove_file(path)
        else:
            self._delete(file)

    def remove_all(self) -> None:
        with self._lock:
            files = [*self._free, *self._out.values()]
            self._free, self._out = [], {}
        for file in files:
            self._delete(file)

    def _delete(self, file: _BatchFile) -> None:
        self._forget(file)
        remove_file(file.path)

    def _forget(self, file: _BatchFile) -> None:
        if file.mapped:
            with self._lock:
                self._mapped -= 1
        file.close()


def remove_file(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
