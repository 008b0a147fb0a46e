"""How a stage worker reads a chunk's images: through the front's own descriptor of the batch file,
checked to be the file the front validated, each image's bytes once, into private memory.

The batch file is opened as ``/proc/<server pid>/fd/<fd>`` (non-blocking), never by its path, and
must be the regular file (same device, inode and size, and a staged copy's tag) the front
validated: nothing swapped in at the path after validation is ever opened. ``pread`` rather than
``mmap``: a client truncating its file while a worker reads a shared mapping would kill the worker
with SIGBUS, whereas a short read is just a per-image error; both copy each byte exactly once.
A chunk of several images that lie back to back in the file (as clients write a batch) is read by
one ``preadv`` into their views: one system call per chunk instead of one per image.
"""

from __future__ import annotations

import itertools
import os
import stat
from typing import Any

from infer_server.messages import ImageRef, WorkItem

_IOV_MAX = os.sysconf("SC_IOV_MAX")  # buffers one preadv takes (1024 on Linux; a chunk holds at most 256 images)


class ChunkReader:
    """Reads a chunk's images into one private buffer that is reused from chunk to chunk.

    A new ``bytes`` per image would cost a page fault per 4 KiB on every chunk: the allocator hands
    that much memory back to the kernel once the chunk is freed and asks for it again for the next
    one (docs/performance.md has what that cost). The views ``read`` returns stay valid until the
    next ``read``: the pipeline is done with a chunk's bytes when its ``process`` returns, and
    nothing keeps them.

    ``owner`` is the process whose descriptors the ``FileRef``s name: the server, this worker's
    parent.
    """

    def __init__(self, owner: int | None = None) -> None:
        self._buffer = bytearray()
        self._fds = f"/proc/{os.getppid() if owner is None else owner}/fd"

    def read(self, item: WorkItem) -> list[memoryview | str]:
        """Each image's bytes, or the client-facing reason it could not be read (never the path)."""
        return self.read_all([item])[0]

    def read_all(self, items: list[WorkItem]) -> list[list[memoryview | str]]:
        """``read`` of every chunk of a group, into the one buffer."""
        opened = [self._open(item) for item in items]
        try:
            total = sum(ref.size for item, (fd, inside) in zip(items, opened, strict=True) if fd is not None
                        for ref, ok in zip(item.images, inside, strict=True) if ok)  # fmt: skip
            if len(self._buffer) < total:  # a new one, not a resize: views of the old may still exist
                self._buffer = bytearray(total)
            view, pos = memoryview(self._buffer), 0
            out: list[list[memoryview | str]] = []
            for item, (fd, inside) in zip(items, opened, strict=True):
                if fd is None:
                    out.append(list(inside))  # the reasons
                    continue
                if 1 < len(inside) <= _IOV_MAX and all(inside) and _back_to_back(item.images):
                    views = []
                    for ref in item.images:
                        views.append(view[pos : pos + ref.size])
                        pos += ref.size
                    out.append(_read_together(fd, item.images, views))
                    continue
                got: list[memoryview | str] = []
                for ref, ok in zip(item.images, inside, strict=True):
                    if not ok:
                        got.append(f"image {ref.index}: byte range lies outside the batch data")
                        continue
                    data = view[pos : pos + ref.size]
                    pos += ref.size
                    n = os.preadv(fd, [data], ref.offset)
                    got.append(data if n == ref.size else f"image {ref.index}: batch data was truncated")
                out.append(got)
            return out
        finally:
            for fd, _ in opened:
                if fd is not None:
                    os.close(fd)

    def _open(self, item: WorkItem) -> tuple[int | None, list[Any]]:
        """The chunk's file, opened through the front's descriptor, and which of its byte ranges
        lie inside it; or None and each image's reason why it cannot be read."""
        try:
            # The front's open file, whatever the path leads to now; O_NONBLOCK: never wait on it.
            fd = os.open(f"{self._fds}/{item.file.fd}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None, [f"image {ref.index}: batch data is no longer available" for ref in item.images]
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None, [f"image {ref.index}: batch data is no longer available" for ref in item.images]
        if (
            not stat.S_ISREG(st.st_mode)
            or (st.st_dev, st.st_ino) != (item.file.dev, item.file.ino)
            or st.st_size != item.file.size
            or (item.file.tag and os.pread(fd, len(item.file.tag), 0) != item.file.tag)
        ):
            os.close(fd)
            return None, [f"image {ref.index}: batch data changed after it was accepted" for ref in item.images]
        return fd, [ref.offset >= 0 and ref.size >= 0 and ref.offset + ref.size <= st.st_size for ref in item.images]


def _back_to_back(refs: tuple[ImageRef, ...]) -> bool:
    """Each image starts where the one before it ends (how clients write a batch)."""
    return all(b.offset == a.offset + a.size for a, b in itertools.pairwise(refs))


def _read_together(fd: int, refs: tuple[ImageRef, ...], views: list[memoryview]) -> list[memoryview | str]:
    """Images back to back in the file, read by one ``preadv`` into their views; one the read did
    not fill (the file was cut short meanwhile) gets its reason instead."""
    end = refs[0].offset + os.preadv(fd, views, refs[0].offset)
    return [data if ref.offset + ref.size <= end else f"image {ref.index}: batch data was truncated"
            for ref, data in zip(refs, views, strict=True)]  # fmt: skip
