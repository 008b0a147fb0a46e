"""The supervisor's channels: to its stage workers, between its own threads, and onto the loop.

Used by ``infer_server.supervisor.pool``: each worker's ``Inbox`` (work items in), the ``Wakeup`` of
the watcher thread that blocks in ``multiprocessing.connection.wait``, and the ``LoopHandoff`` that
runs the pool's callbacks on the server's event loop. Results come back on a plain ``Connection``
per worker (see the pool's docstring for why a pipe per worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import multiprocessing
import os
import struct
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from infer_server.messages import ImageOutcome, WorkItem, dumps, loads

log = logging.getLogger(__name__)

INBOX_BYTES = 1 << 20  # asked for each worker's inbox pipe (pipe-max-size, 1 MiB by default, allows it)
_PAGE = 4096
READ_BYTES = 1 << 18  # taken from a result pipe per read: hundreds of messages
_LENGTH, _LONG_LENGTH = struct.Struct("!i"), struct.Struct("!Q")  # Connection.send_bytes's framing


class Inbox:
    """The pool's end of a worker's inbox: a pipe that takes whole pickled work items without blocking.

    Written under the pool's lock, from the event loop (``submit_batch``, a worker's answer) or the
    watcher thread (a death, a restart), so a write must never wait for the worker: a worker holds
    at most ``items`` items (chosen per pipe, from the size it got) and the stop marker follows
    them, so every item that fits in an ``items + 1``-th of the pipe (with a page of slack at each
    end, pipes fill page by page) is written at once. No thread
    hands items over (``multiprocessing.Queue`` has one: a wake-up per item). An item that would
    not fit (very long image names in a very large chunk) is sent without its names;
    ``PipelinePool`` puts them back into the outcomes from its ledger.
    """

    def __init__(self, conn: Connection, batch_size: int = 1, wanted: int = 2, least: int = 2) -> None:
        self.conn = conn
        self._fd = conn.fileno()  # -1 once closed: a write then fails (EBADF), never lands on a reused number
        with contextlib.suppress(OSError):  # keep the default size where a larger one is not allowed
            fcntl.fcntl(conn.fileno(), fcntl.F_SETPIPE_SZ, INBOX_BYTES)
        self.capacity = fcntl.fcntl(conn.fileno(), fcntl.F_GETPIPE_SZ)
        need = 8192 + 64 * batch_size  # a path (< 4 KiB), the ids, ≤ 54 bytes per image
        # The items its worker may hold: ``wanted`` if each may take its share of this pipe (whatever
        # size it got), else ``least``.
        self.items = next((n for n in (wanted, least) if self._share(n) >= need), least)
        self.fits = self._share(self.items) >= need
        self.limit = self._share(self.items)

    def _share(self, items: int) -> int:
        return self.capacity // (items + 1) - 2 * _PAGE  # the stop marker follows the items

    @staticmethod
    def credit(batch_size: int, wanted: int, least: int) -> int:
        """How many items a worker may hold, from a pipe made as inboxes are: ``wanted`` if an inbox
        then takes any item of ``batch_size`` images without names, else ``least`` if that does (a
        pipe that cannot grow to ``INBOX_BYTES``), else ``ValueError``."""
        reader, writer = multiprocessing.Pipe(duplex=False)
        inbox = Inbox(writer, batch_size, wanted, least)
        reader.close()
        inbox.close()
        if not inbox.fits:
            raise ValueError(
                f"a worker inbox pipe holds {inbox.capacity} bytes, too few for chunks of {batch_size} images: "
                "lower --batch-size or raise /proc/sys/fs/pipe-max-size"
            )
        return inbox.items

    def put(self, item: WorkItem | None) -> bool:
        """Send ``item`` (or the stop marker); True if it went without its images' names.
        BrokenPipeError if the worker is gone."""
        frame = dumps(item)
        nameless = len(frame) > self.limit and item is not None
        if nameless:
            assert item is not None
            refs = tuple(dataclasses.replace(ref, name="") for ref in item.images)
            frame = dumps(dataclasses.replace(item, images=refs))
        # Connection.send_bytes's framing (the worker reads with recv_bytes), in one write and one
        # Python call: the frame is within the pipe's share, so it goes at once.
        data = _LENGTH.pack(len(frame)) + frame
        written = os.write(self._fd, data)
        while written < len(data):  # a signal cut it short
            written += os.write(self._fd, memoryview(data)[written:])
        return nameless

    def close(self) -> None:
        self._fd = -1
        self.conn.close()


class ResultReader:
    """The loop's end of a worker's result pipe: every whole message it holds, from one
    non-blocking read. The worker writes with ``Connection.send_bytes`` (a 4-byte length, or -1
    and an 8-byte one, then what ``messages.dumps`` made); ``Connection.recv`` would read each
    message in two system calls, and ``Connection.poll`` builds a selector to tell whether another
    one follows."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        os.set_blocking(conn.fileno(), False)  # the worker's end stays blocking: its own description
        self._partial = b""  # the start of a message the next read completes

    def read(self) -> tuple[list[Any], bool]:
        """The messages the pipe holds now (maybe none), and whether it ended: the worker closed it
        or died (a message it left cut short is dropped), or a message would not decode."""
        try:
            data = os.read(self.conn.fileno(), READ_BYTES)
        except BlockingIOError:  # a spurious wake-up: nothing to read yet
            return [], False
        except OSError:
            return [], True
        if not data:
            return [], True
        if self._partial:
            data = self._partial + data
        messages: list[Any] = []
        offset, size = 0, len(data)
        with memoryview(data) as view:
            while size - offset >= _LENGTH.size:
                (length,) = _LENGTH.unpack_from(data, offset)
                start = offset + _LENGTH.size
                if length == -1:
                    if size - start < _LONG_LENGTH.size:
                        break
                    (length,) = _LONG_LENGTH.unpack_from(data, start)
                    start += _LONG_LENGTH.size
                if size - start < length:
                    break
                try:
                    messages.append(loads(view[start : start + length]))
                except Exception:
                    log.exception("a message of %d bytes from a worker would not decode", length)
                    return messages, True
                offset = start + length
        self._partial = data[offset:]
        return messages, False


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


class LoopHandoff:
    """Calls made from the pool's threads, run on the loop: outcomes in bursts (one wake-up of the
    loop takes every outcome queued since), anything else one call at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_outcomes: Callable[[list[ImageOutcome]], None]) -> None:
        self._loop, self._on_outcomes = loop, on_outcomes
        self._queued: list[ImageOutcome] = []
        self._lock = threading.Lock()
        self._scheduled = False
        self._loop_thread: int | None = None  # the loop's thread, once a call was seen to come from it

    def on_loop(self) -> bool:
        """This thread runs the loop. Asked of the running loop until it answers yes once, then of
        the thread's id: ``asyncio.get_running_loop`` makes a ``getpid`` system call, and this is
        asked for every answer a worker sends."""
        thread = threading.get_ident()
        if self._loop_thread is not None:
            return thread == self._loop_thread and self._loop.is_running()
        try:
            running = asyncio.get_running_loop() is self._loop
        except RuntimeError:  # no loop runs in this thread
            return False
        if running:
            self._loop_thread = thread
        return running

    def call(self, callback: Callable[..., None], *args: Any) -> None:
        """``callback(*args)`` on the loop: now if this is the loop's thread, else soon."""
        if self.on_loop():
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
            self._loop.call_soon_threadsafe(callback, *args)

    def outcomes(self, outcomes: list[ImageOutcome]) -> None:
        if self.on_loop():
            self._run(outcomes)
            return
        with self._lock:
            self._queued += outcomes
            if self._scheduled:
                return
            self._scheduled = True
        self.call(self._flush)

    def _flush(self) -> None:
        with self._lock:
            outcomes, self._queued, self._scheduled = self._queued, [], False
        self._run(outcomes)

    def _run(self, outcomes: list[ImageOutcome]) -> None:
        try:
            self._on_outcomes(outcomes)
        except Exception:
            log.exception("on_outcomes failed for %d images", len(outcomes))
