"""The tmpfs handoff: turns a PushData request into a validated batch file the workers may read.

Called by ``front.server`` in the server's main process: :meth:`Handoff.plan` on the event loop
(cheap checks on sizes and names, before admission), :meth:`Handoff.materialize` for the file
system work, in a thread, except where a memory file system (tmpfs, ramfs) cannot make it wait for
a device: a client file there is validated, and small inline data staged there, on the loop (a few
syscalls cost less than the hop to a thread). Nothing here trusts a path: see
docs/architecture.md "Security of the handoff".

A client path must name a file beneath the shared directory, outside the server's staging
directories (every shard's, with ``--shards``). It is opened one component at a time from a
descriptor of the root with ``O_NOFOLLOW`` and no ``..`` (RESOLVE_BENEATH by hand), so no symlink
is crossed even if the tree changes between the check and the open; a path that cannot be placed
lexically, or meets a symlink, is resolved on real paths (``os.path.commonpath``) to tell why it
is refused. Every property (regular file, one link, same file system, not writable by
group/others, size == sum(sizes)) is read from the open descriptor, which the front keeps until
the batch is done: the workers read through it, never by path. The shared directory must belong
to the server's user and, if others may write to it, have the sticky bit. Inline data is written
into the server's own staging directory (0600, temp name + rename, only through descriptors the
server holds) so the pipeline reads both kinds the same way; those files go when the batch
completes (or are kept to be rewritten: ``front.staging``'s spares), and ``front.upkeep`` removes
what a crashed run left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from infer_server.front.directories import DIR_FLAGS, check_shared_root, filesystem_type, open_dir
from infer_server.front.errors import InvalidBatch, Overloaded, PermissionDeniedError
from infer_server.front.layout import BatchPlan, HandoffLimits, plan_batch
from infer_server.front.staging import StagingDir, after
from infer_server.messages import FileRef, ImageRef

log = logging.getLogger(__name__)

STAGE_ON_LOOP_BYTES = 1 << 20  # inline data up to this is staged on the loop when staging is on tmpfs (a copy)
# O_NONBLOCK: opening a FIFO for reading would otherwise block until a writer shows up.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_OUTSIDE = "path is outside the shared directory"
_STAGING = "path points into the server's own directory"
# One answer for a file that is missing, unreadable, or another user's: a caller learns nothing
# about files it may not push (not even that they exist, let alone their size or content).
_NOT_YOURS = "no file at this path that this caller may push (it must exist and belong to a user the caller is allowed)"


@dataclass(frozen=True)
class BatchFile:
    """A validated batch: the file the workers read (the front holds it open: ``file.fd``; they
    recognise it by device, inode and size) and its images."""

    file: FileRef
    images: tuple[ImageRef, ...]
    staged: bool  # the server's own copy of inline data: deleted (or kept as a spare) when the batch completes
    tier: int = 0  # of a staged copy: 0 the staging directory, 1 the spill directory

    @property
    def path(self) -> str:
        return self.file.path


def _busy(exc: OSError) -> Overloaded | None:
    """Out of space or descriptors is the server's state, not the request's fault: retry later."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return Overloaded("the server's shared directory is full; retry later")
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return Overloaded("the server is out of file descriptors; retry later")
    return None


class Handoff:
    """Validation and staging for one shared directory (``root``) and its staging directory."""

    def __init__(
        self, root: Path, staging: Path, limits: HandoffLimits, spill: Path | None = None, spill_at: float = 0.8,
        others: Sequence[Path] = (),  # the other shards' staging directories (--shards): closed to clients too
    ) -> None:  # fmt: skip
        self._root, self.limits, self._others = Path(root), limits, others
        self._real_root = ""
        # Where inline batches are staged: the staging directory, then (over ``spill_at`` of its file
        # system in use, or out of space there) the spill directory on disk. Every server-side
        # create, list and delete goes through their held descriptors (``front.staging``).
        self.tiers = [StagingDir(staging)] + ([StagingDir(spill, "spill directory")] if spill else [])
        self.spill_at = spill_at
        self.spills = self.demotions = 0  # inline batches staged in the spill directory; staged ones moved there
        self.staged_bytes = [0] * len(self.tiers)  # bytes staged now, per tier
        self._bases: tuple[str, ...] = ()  # the root's names a client path may start with
        self._staging_parts: list[list[str]] = []  # of each staging directory beneath the root
        self._root_dev, self.in_memory = -1, False  # in_memory: the shared directory is on tmpfs/ramfs
        self._root_fd = -1  # the shared directory, held open from prepare_dirs on
        self._batch_fds: dict[int, BatchFile] = {}  # validated batch files, open until their batch is done
        self._lock = threading.Lock()

    def prepare_dirs(self) -> None:
        """Create the shared and staging directories (owner-only when the server creates them) and
        refuse any the server cannot trust (``RuntimeError`` saying how to fix it)."""
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._real_root = os.path.realpath(self._root)
        root_fd = open_dir(self._real_root, "shared directory")
        try:
            check_shared_root(os.fstat(root_fd), self._real_root)
        except BaseException:
            os.close(root_fd)
            raise
        if self._root_fd >= 0:
            os.close(self._root_fd)
        self._root_fd = root_fd  # client files are opened beneath the directory checked here, whatever its name becomes
        for tier in self.tiers[1:]:
            if os.path.commonpath([self._real_root, os.path.realpath(tier.path)]) == self._real_root:
                raise RuntimeError(f"{tier.what} {tier.path} must be outside the shared directory")
        for tier in self.tiers:
            tier.open(self._real_root)
        self._bases = tuple(dict.fromkeys((os.path.normpath(self._root), self._real_root)))
        self._staging_real: list[str] = [self.tiers[0].real, *map(os.path.realpath, self._others)]
        beneath = [d for d in self._staging_real if os.path.commonpath([self._real_root, d]) == self._real_root]
        for rel in (os.path.relpath(d, self._real_root) for d in beneath):
            self._staging_parts.append([] if rel == "." else rel.split(os.sep))  # []: the root itself
        self._root_dev = os.stat(self._real_root).st_dev
        self.in_memory = filesystem_type(self._real_root) in ("tmpfs", "ramfs")

    def plan(self, path: str, data: bytes, sizes: Sequence[int], names: Sequence[str]) -> BatchPlan:
        """The request's layout checked against this handoff's limits (``front.layout``)."""
        return plan_batch(self.limits, path, data, sizes, names)

    def materialize(self, plan: BatchPlan, owners: Collection[int] | None = None) -> BatchFile:
        """Validate the client's file (``owners``: the uids whose files this caller may push; default:
        the server's own uid), or stage the inline data. Blocking: run it in a thread."""
        if plan.path is not None:
            allowed = frozenset({os.geteuid()}) if owners is None else owners
            return self.open_client_file(plan.path, plan.images, plan.total_bytes, allowed)
        assert plan.data is not None
        return self.stage_inline(plan.data, plan.images)

    def open_client_file(
        self, path: str, images: tuple[ImageRef, ...], total: int, owners: Collection[int]
    ) -> BatchFile:
        fd, st, real = self.open_file(path, owners)
        if st.st_size != total:
            os.close(fd)
            raise InvalidBatch(f"sizes add up to {total} bytes but the file holds {st.st_size}")
        return self._held(BatchFile(FileRef(real, st.st_dev, st.st_ino, st.st_size, fd), images, staged=False))

    def open_file(self, path: str, owners: Collection[int]) -> tuple[int, os.stat_result, str]:
        """A caller's file beneath the shared directory, opened and checked (see the module) but
        for its size: its descriptor, its stat and its real path. Also ``front.regions``'."""
        parts = self._components(path)
        try:
            fd = self._open_beneath_root(parts)
        except PermissionDeniedError:
            self._confine(path)  # a symlink on the way: say where it leads if that is the reason
            raise
        try:
            st = os.fstat(fd)
            if st.st_uid not in owners:  # first: nothing else about the file may show
                raise PermissionDeniedError(_NOT_YOURS)
            self._check_client_file(st)
        except BaseException:
            os.close(fd)
            raise
        return fd, st, os.path.join(self._real_root, *parts)

    def _check_client_file(self, st: os.stat_result) -> None:
        if not stat.S_ISREG(st.st_mode):
            raise InvalidBatch("path is not a regular file")
        if st.st_dev != self._root_dev:
            raise PermissionDeniedError("file is not on the shared file system")
        if st.st_nlink != 1:
            # A hard link can make a file from elsewhere appear beneath the root.
            raise PermissionDeniedError("file has more than one hard link")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise PermissionDeniedError("file is writable by group or others")

    def adopt(self, fd: int, st: os.stat_result, path: str, images: tuple[ImageRef, ...]) -> BatchFile:
        """A batch file opened and checked elsewhere (a shared-memory region's), held from now on."""
        return self._held(BatchFile(FileRef(path, st.st_dev, st.st_ino, st.st_size, fd), images, staged=False))

    def _held(self, batch: BatchFile) -> BatchFile:
        with self._lock:
            self._batch_fds[batch.file.fd] = batch
        return batch

    def _components(self, path: str) -> list[str]:
        """The path's components beneath the root, read lexically: the hot path of every push. Enough
        for what is opened: ``_open_beneath_root`` walks them from the root's descriptor crossing no
        symlink, and none is ``..`` (RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, by hand). A path not
        lexically beneath the root goes through ``_confine`` on real paths, which says why not."""
        if "\x00" in path:
            raise InvalidBatch("path contains a NUL byte")
        if ".." in path.split("/"):
            raise PermissionDeniedError(_OUTSIDE)
        lexical = os.path.normpath(path if path.startswith("/") else os.path.join(self._bases[0], path))
        for base in self._bases:
            if lexical.startswith(base) and lexical[len(base) : len(base) + 1] == "/":
                parts = lexical[len(base) + 1 :].split("/")
                if any(parts[: len(staging)] == staging for staging in self._staging_parts):
                    raise PermissionDeniedError(_STAGING)
                return parts
        return self._confine(path)

    def _confine(self, path: str) -> list[str]:
        """The path's components beneath the root on real paths, or an error if it leaves the root
        or enters staging (resolves every component: for paths ``_components`` cannot place)."""
        if "\x00" in path:
            raise InvalidBatch("path contains a NUL byte")
        pure = PurePosixPath(path)
        if ".." in pure.parts:
            raise PermissionDeniedError(_OUTSIDE)
        lexical = os.path.normpath(pure if pure.is_absolute() else self._root / pure)
        real = os.path.realpath(lexical)
        if os.path.commonpath([self._real_root, real]) != self._real_root or real == self._real_root:
            raise PermissionDeniedError(_OUTSIDE)
        if any(os.path.commonpath([staging, real]) == staging for staging in self._staging_real):
            raise PermissionDeniedError(_STAGING)
        # Components to walk from the root: relative to the configured or the real root name.
        for base in (os.path.normpath(self._root), self._real_root):
            rel = os.path.relpath(lexical, base)
            if rel != "." and not rel.startswith(".."):
                return rel.split(os.sep)
        # The lexical path reaches the root through some other (symlinked) name.
        raise PermissionDeniedError("path must not contain symbolic links")

    def _open_beneath_root(self, parts: list[str]) -> int:
        """Open ``parts`` from a descriptor of the root, never following a symlink on the way."""
        if not parts:  # the root itself: never a batch file, and its held descriptor is never handed out
            raise PermissionDeniedError(_NOT_YOURS)
        root = dir_fd = self._root_fd  # held from prepare_dirs on: never closed here
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    fd = os.open(part, _FILE_FLAGS if last else DIR_FLAGS, dir_fd=dir_fd)
                except OSError as exc:
                    raise self._open_error(exc, part, dir_fd) from None
                if dir_fd != root:
                    os.close(dir_fd)
                dir_fd = fd
            fd, dir_fd = dir_fd, root
            return fd
        finally:
            if dir_fd != root:
                os.close(dir_fd)

    @staticmethod
    def _open_error(exc: OSError, part: str, dir_fd: int) -> Exception:
        if (busy := _busy(exc)) is not None:
            return busy
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                return PermissionDeniedError("path must not contain symbolic links")
        return PermissionDeniedError(_NOT_YOURS)  # missing, forbidden, a socket (ENXIO), ...: one answer

    def stage_inline(self, data: bytes, images: tuple[ImageRef, ...]) -> BatchFile:
        """Write inline bytes to a fresh 0600 file of a staging tier: the staging directory while its
        file system is under ``spill_at`` in use, else (or when it is out of space) the spill
        directory. Out of space everywhere is ``Overloaded`` (retry later), never a lost image."""
        error: OSError | None = None
        over = [n for n, tier in enumerate(self.tiers[:-1]) if tier.used() > self.spill_at]
        for number in [n for n in range(len(self.tiers)) if n not in over] + over:  # over the mark: last
            try:
                return self._stage_into(number, data, images)
            except OSError as exc:
                error = exc
                if _busy(exc) is None:
                    break  # not out of space: another tier would do no better
        assert error is not None
        raise _busy(error) or error from None

    def stage_on_loop(self, data: bytes, images: tuple[ImageRef, ...]) -> BatchFile | None:
        """``stage_inline`` on the loop where that cannot wait on a device (small data, a staging directory
        on a memory file system under its mark); else or on failure None: ``stage_inline`` in a thread."""
        if not self.tiers[0].in_memory or len(data) > STAGE_ON_LOOP_BYTES or self.over_mark():
            return None
        with contextlib.suppress(OSError):
            return self._stage_into(0, data, images)
        return None

    def _stage_into(self, number: int, data: bytes, images: tuple[ImageRef, ...]) -> BatchFile:
        path, fd, st, tag = self.tiers[number].stage(data)
        with self._lock:
            self.staged_bytes[number] += st.st_size
            self.spills += number > 0
        file = FileRef(path, st.st_dev, st.st_ino, st.st_size, fd, tag)  # the images follow the tag
        return self._held(BatchFile(file, after(tag, images), staged=True, tier=number))

    def over_mark(self) -> bool:
        """The staging directory's file system is over ``spill_at`` and there is a disk tier."""
        return len(self.tiers) > 1 and self.tiers[0].fd >= 0 and self.tiers[0].used() > self.spill_at

    def demote(self, batch: BatchFile) -> BatchFile:
        """A copy of a staged batch in the spill directory (in the kernel, never read into memory),
        held like any batch file. Blocking: run it in a thread. The caller swaps it in for
        ``batch`` and releases the one it no longer uses (``front.upkeep``)."""
        spill = len(self.tiers) - 1
        with self._lock:  # a descriptor of its own: the batch may finish (and its number be reused) meanwhile
            if self._batch_fds.get(batch.file.fd) is not batch:
                raise FileNotFoundError(f"batch file {batch.path} was released")
            source = os.dup(batch.file.fd)
        try:
            path, fd, st, _ = self.tiers[spill].stage((source, batch.file.size))
        finally:
            os.close(source)
        with self._lock:
            self.staged_bytes[spill] += st.st_size
        file = FileRef(path, st.st_dev, st.st_ino, st.st_size, fd, batch.file.tag)  # copied with the file
        return self._held(BatchFile(file, batch.images, staged=True, tier=spill))

    def recount(self) -> list[int]:
        """Set the per-tier staged bytes from the batch files held now (the truth, whatever a
        missed release or a failed unlink left in the running sums); returns the old sums."""
        with self._lock:
            true = [0] * len(self.tiers)
            for batch in (held for held in self._batch_fds.values() if held.staged):
                true[batch.tier] += batch.file.size
            old, self.staged_bytes = self.staged_bytes, true
        return old

    def release(self, batch: BatchFile) -> None:
        """The batch is done (once): close its descriptor and delete the server's staging copy (never
        a client's file), or keep the copy as a spare for the next inline batch (``front.staging``)."""
        with self._lock:  # this batch's own descriptor, never a number since reused by another
            if self._batch_fds.get(batch.file.fd) is not batch:
                return
            del self._batch_fds[batch.file.fd]
            if batch.staged:
                self.staged_bytes[batch.tier] -= batch.file.size
                if self.tiers[batch.tier].keep(batch.path, batch.file.fd, batch.file.size, self.spill_at):
                    return
            os.close(batch.file.fd)
        if batch.staged:  # outside the lock: a delete on disk must not hold up the loop's staging
            self.tiers[batch.tier].unlink(batch.path)

    def sweep(self, ttl_s: float, keep: Collection[str] = ()) -> int:
        """Remove staging files (of every tier) older than ``ttl_s`` that no live batch uses."""
        return sum(tier.sweep(ttl_s, keep) for tier in self.tiers if tier.fd >= 0)

    def remove_staging_dir(self) -> None:
        """On a clean stop: drop every staging file and directory (each only if it is still the one
        the server created: never something put in its place), and every descriptor held."""
        with self._lock:
            fds, self._batch_fds = self._batch_fds, {}
        for fd in fds:
            os.close(fd)
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1
        with self._lock:  # a late release must not unlink through a closed (reused) number
            for tier in self.tiers:
                tier.remove()
