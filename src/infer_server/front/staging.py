"""A directory of the server's own files (staged copies of inline batches), held by descriptor.

Used by ``front.handoff.Handoff``, in the server's main process: one ``StagingDir`` for the staging
directory (on the shared tmpfs by default) and, with ``--spill-dir``, one for the disk tier that
new staging goes to when the tmpfs is over ``--spill-at`` of its capacity (``Handoff.stage_inline``).

Nothing here trusts a path. The directory is opened once (``O_DIRECTORY|O_NOFOLLOW``), must be the
server's and 0700, and is locked (``flock``) so that no second server uses it; every create,
rename, list and delete goes through the descriptors held from ``open`` to ``remove``. Files are
written under a temporary name and renamed; what a killed server left is cleared at ``open``.

Spare files. On a memory file system, a new file's pages are allocated as it is written and freed
when it is deleted, which costs more than the copy itself (docs/performance.md). So a released file
of at most ``SPARE_BYTES`` is kept open (``keep``, up to ``SPARE_FILES`` of them) and the next
``stage`` rewrites it in place: its pages are reused, and it is cut to the new data's size. A file
is released once every image of its batch was answered, which a worker does only after reading its
chunk, or the registry does for a batch overdue (a chunk may then still be in a worker's hands).
So every staging of a file starts with a tag of its own (``TAG`` bytes, before the images) that
the ``FileRef`` carries and the worker checks: a chunk of an earlier batch never reads a later
one's bytes. No file is kept while the staging directory is over ``--spill-at``
(``Handoff.release``): freeing it is what spilling is for.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import re
import threading
from collections.abc import Collection
from pathlib import Path

from infer_server.front.directories import DIR_FLAGS, filesystem_type, open_dir
from infer_server.messages import ImageRef

log = logging.getLogger(__name__)

# The names ``stage`` gives its files (and their temporary names): a sweep touches nothing else.
_OURS = re.compile(r"\.?[0-9a-f]{32}\.(batch|tmp)")
TAG = 8  # bytes of a staged file's tag (a count), before its data
SPARE_FILES = 16  # released files kept for reuse, per directory on a memory file system
SPARE_BYTES = 1 << 20  # the largest file kept


class StagingDir:
    """One staging directory: ``open``, then ``stage`` / ``unlink`` / ``sweep``, then ``remove``."""

    def __init__(self, path: Path, what: str = "staging directory") -> None:
        self.path = Path(path)
        self.what = what
        self.real = ""
        self.fd = -1
        self._parent_fd = -1
        self._name = ""
        self.in_memory = False  # on tmpfs/ramfs: staging there does not wait for a device
        self._fd_lock = threading.Lock()  # ``unlink`` (any thread) against ``remove`` closing ``fd``
        # File names: this run's random prefix, then a count (unique without a syscall per file;
        # a count's next() is atomic, and staging runs in threads).
        self._prefix, self._count = os.urandom(8).hex(), itertools.count()
        self._tags = itertools.count(1)  # next() is atomic: staging runs in threads
        self._spares: list[tuple[str, int]] = []  # released files kept open for reuse: (path, descriptor)
        self._spare_lock = threading.Lock()
        self._removing = False  # ``remove`` took the spares: keep no more

    def open(self, shared_root: str) -> None:
        """Create (0700) or open the directory and refuse one the server cannot trust
        (``RuntimeError`` saying how to fix it); clear what an earlier server left."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The directory itself is never resolved: a symlink in its place is refused.
        parent, self._name = os.path.split(os.path.normpath(self.path.absolute()))
        self.real = os.path.join(os.path.realpath(parent), self._name)
        if os.path.commonpath([self.real, shared_root]) == self.real:
            # Its files are the server's to delete: it cannot be (or hold) the clients' directory.
            raise RuntimeError(f"{self.what} {self.path} must not be the shared directory or contain it")
        self._parent_fd = open_dir(os.path.dirname(self.real), f"{self.what}'s parent")
        try:
            self.fd = os.open(self._name, DIR_FLAGS, dir_fd=self._parent_fd)
        except OSError:
            raise RuntimeError(
                f"{self.what} {self.path} is not a directory (a symbolic link?): remove it and start again"
            ) from None
        st = os.fstat(self.fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise RuntimeError(f"{self.what} {self.path} must be a 0700 directory of this user")
        self.in_memory = filesystem_type(self.real) in ("tmpfs", "ramfs")
        try:  # one server per staging directory; the lock goes with the process, however it ends
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another server is using the {self.what} {self.path}: give each server its own directories"
            ) from None
        left = self.sweep(0.0)  # a server killed before it could clean up left these; none is in use now
        if left:
            log.info("removed %d files an earlier server left behind in the %s", left, self.what)

    def stage(self, data: bytes | tuple[int, int]) -> tuple[str, int, os.stat_result, bytes]:
        """Write ``data`` (bytes, after a new tag; or ``(fd, size)``: that many bytes of another open
        file, its tag included) to a fresh 0600 file (temporary name, then rename), both relative to
        the directory's descriptor; returns its path, its open descriptor, its stat and the tag
        (b"" for a copy). ``OSError`` (ENOSPC among them) leaves nothing behind. Bytes go into a
        spare file if there is one (rewritten, then cut to size)."""
        tag = next(self._tags).to_bytes(TAG, "little") if isinstance(data, bytes) else b""
        if isinstance(data, bytes) and (spare := self._take_spare()) is not None:
            return (*self._rewrite(*spare, tag, data), tag)
        name = f"{self._prefix}{next(self._count):016x}"
        tmp, final = f".{name}.tmp", f"{name}.batch"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=self.fd)
        try:
            if isinstance(data, tuple):
                _copy(data[0], fd, data[1])
            else:
                _write_at_start(fd, tag, data)
            st = os.fstat(fd)
            # No fsync: a crash loses the batch anyway.
            os.rename(tmp, final, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self.fd)
            os.close(fd)
            raise
        return os.path.join(self.real, final), fd, st, tag

    def keep(self, path: str, fd: int, size: int, below: float = 1.0) -> bool:
        """Keep a released file of this directory (and its open ``fd``) for ``stage`` to reuse: True
        if kept, else the caller closes and deletes it (a disk, a file too large, spares enough, or
        the file system over ``below`` in use)."""
        if not self.in_memory or size > SPARE_BYTES or self._removing:
            return False
        try:
            if self.used() > below:
                return False
        except OSError:  # removed meanwhile
            return False
        with self._spare_lock:
            if len(self._spares) >= SPARE_FILES or self._removing:
                return False
            self._spares.append((path, fd))
            return True

    @property
    def spares(self) -> int:
        return len(self._spares)

    def drop_spares(self) -> None:
        """Close and delete every spare (its file system filled up: ``front.upkeep``)."""
        with self._spare_lock:
            spares, self._spares = self._spares, []
        for path, fd in spares:
            os.close(fd)
            self.unlink(path)

    def _take_spare(self) -> tuple[str, int] | None:
        with self._spare_lock:
            return self._spares.pop() if self._spares else None

    def _rewrite(self, path: str, fd: int, tag: bytes, data: bytes) -> tuple[str, int, os.stat_result]:
        """A spare file made exactly ``tag`` and ``data``; on failure (ENOSPC growing it) it is dropped."""
        try:
            os.ftruncate(fd, _write_at_start(fd, tag, data))
            return path, fd, os.fstat(fd)
        except BaseException:
            os.close(fd)
            self.unlink(path)
            raise

    def unlink(self, path: str) -> None:
        """Delete one of this directory's files (by its name, through the held descriptor, which
        ``remove`` cannot close meanwhile: any thread may call this)."""
        with self._fd_lock:
            if self.fd >= 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.basename(path), dir_fd=self.fd)

    def sweep(self, ttl_s: float, keep: Collection[str] = ()) -> int:
        """Remove files older than ``ttl_s`` (by mtime) that are not in ``keep`` (nor spares)."""
        import time

        now = time.time()
        with self._spare_lock:
            keep = {*keep, *(path for path, _ in self._spares)} if ttl_s > 0 else keep
        removed = 0
        with os.scandir(self.fd) as entries:
            for entry in entries:
                if not _OURS.fullmatch(entry.name) or os.path.join(self.real, entry.name) in keep:
                    continue  # only the server's own names: nothing an operator put there
                if not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat(follow_symlinks=False).st_mtime >= ttl_s:
                        os.unlink(entry.name, dir_fd=self.fd)
                        removed += 1
        return removed

    def used(self) -> float:
        """The share of its file system in use (blocks or inodes, whichever is higher)."""
        st = os.fstatvfs(self.fd)
        blocks = 1 - st.f_bavail / st.f_blocks if st.f_blocks else 0.0
        inodes = 1 - st.f_favail / st.f_files if st.f_files else 0.0
        return max(blocks, inodes)

    def remove(self) -> None:
        """Drop the server's files and the directory itself (if it is still the one opened and now
        empty: never something put in its place, nor what an operator keeps there), and close the
        descriptors."""
        with self._fd_lock:
            self._remove()

    def _remove(self) -> None:
        if self.fd < 0:
            return
        with self._spare_lock:
            spares, self._spares, self._removing = self._spares, [], True
        for _, fd in spares:
            os.close(fd)
        self.sweep(0.0)
        mine = os.fstat(self.fd)
        with contextlib.suppress(OSError):
            there = os.stat(self._name, dir_fd=self._parent_fd, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                os.rmdir(self._name, dir_fd=self._parent_fd)
        os.close(self.fd)
        os.close(self._parent_fd)
        self.fd = self._parent_fd = -1


def _write_at_start(fd: int, *parts: bytes) -> int:
    """Write ``parts`` back to back from the start of ``fd`` (no copy into one buffer); their size."""
    views = [memoryview(part) for part in parts if part]
    total, done = sum(len(view) for view in views), 0
    while views:
        written = os.pwritev(fd, views, done)
        done += written
        while views and written >= len(views[0]):
            written -= len(views.pop(0))
        if views:
            views[0] = views[0][written:]
    return total


def _copy(src: int, dst: int, size: int) -> None:
    """``size`` bytes from the start of ``src`` to ``dst``, in the kernel (``sendfile``): a staged
    batch moving to another tier is never read into the process. A short source is an error."""
    offset = 0
    while offset < size:
        sent = os.sendfile(dst, src, offset, size - offset)
        if sent == 0:
            raise OSError(errno.EIO, f"staged file ended after {offset} of {size} bytes")
        offset += sent


def after(tag: bytes, images: tuple[ImageRef, ...]) -> tuple[ImageRef, ...]:
    """``images`` of data staged after ``tag``: each offset moved past it."""
    return tuple(ImageRef(r.index, r.offset + len(tag), r.size, r.name) for r in images) if tag else images
