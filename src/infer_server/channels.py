"""The pipes between the worker pool (server process) and its stage workers, and a wake-up pipe.

Used by ``infer_server.pool``: each worker's ``Inbox`` (work items in) and a ``Wakeup`` per pool
thread that blocks in ``multiprocessing.connection.wait``. Results come back on a plain
``Connection`` per worker (see the pool's docstring for why a pipe per worker).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

from infer_server.messages import WorkItem

INBOX_BYTES = 1 << 20  # asked for each worker's inbox pipe (pipe-max-size, 1 MiB by default, allows it)
_PAGE = 4096


class Inbox:
    """The pool's end of a worker's inbox: a pipe that takes whole pickled work items without blocking.

    Written under the pool's lock, from the event loop (``submit_batch``) or the reader thread, so
    a write must never wait for the worker: a worker holds at most ``holds - 1`` items (the pool's
    ``CREDIT``) and the stop marker follows them, so every item that fits in a ``holds``-th of the
    pipe (with a page of slack at each end, pipes fill page by page) is written at once. No thread
    hands items over (``multiprocessing.Queue`` has one: a wake-up per item). An item that would
    not fit (very long image names in a very large chunk) is sent without its names;
    ``PipelinePool`` puts them back into the outcomes from its ledger.
    """

    def __init__(self, conn: Connection, holds: int) -> None:
        self.conn = conn
        with contextlib.suppress(OSError):  # keep the default size where a larger one is not allowed
            fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, INBOX_BYTES)
        self.capacity = fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
        self.limit = self.capacity // holds - 2 * _PAGE

    @staticmethod
    def check(batch_size: int, holds: int) -> None:
        """Raise ``ValueError`` unless an inbox takes any item of ``batch_size`` images without names."""
        reader, writer = multiprocessing.Pipe(duplex=False)
        inbox = Inbox(writer, holds)
        reader.close()
        inbox.close()
        if inbox.limit < 8192 + 64 * batch_size:  # a path (< 4 KiB), the ids, ≤ 54 bytes per image
            raise ValueError(
                f"a worker inbox pipe holds {inbox.capacity} bytes, too few for chunks of {batch_size} images: "
                "lower --batch-size or raise /proc/sys/fs/pipe-max-size"
            )

    def put(self, item: WorkItem | None) -> bool:
        """Send ``item`` (or the stop marker); True if it went without its images' names.
        BrokenPipeError if the worker is gone."""
        frame = ForkingPickler.dumps(item)
        nameless = len(frame) > self.limit and item is not None
        if nameless:
            assert item is not None
            refs = tuple(dataclasses.replace(ref, name="") for ref in item.images)
            frame = ForkingPickler.dumps(dataclasses.replace(item, images=refs))
        self.conn.send_bytes(frame)
        return nameless

    def close(self) -> None:
        self.conn.close()


class Wakeup:
    """Lets a thread blocked in ``connection.wait`` notice that its wait list changed."""

    def __init__(self) -> None:
        self.reader, self._writer = multiprocessing.Pipe(duplex=False)

    def set(self) -> None:
        self._writer.send_bytes(b"!")

    def clear(self) -> None:
        while self.reader.poll():
            self.reader.recv_bytes()

    def close(self) -> None:
        self.reader.close()
        self._writer.close()
