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
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from infer_server.messages import ImageOutcome, WorkItem, dumps, loads
from infer_server.pipes import FrameReader, frame

log = logging.getLogger(__name__)

INBOX_BYTES = 1 << 20  # asked for each worker's inbox pipe (pipe-max-size, 1 MiB by default, allows it)
_PAGE = 4096


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

    ``hold`` (``WriteCoalescer.hold``) may keep an item back to go with the next ones (it then
    calls ``flush``): items are written in the order put, never beyond its credit, so however many
    go in one write, they fit.
    """

    def __init__(
        self, conn: Connection, batch_size: int = 1, wanted: int = 2, least: int = 2,
        hold: Callable[[Inbox], bool] | None = None,
    ) -> None:  # fmt: skip
        self.conn = conn
        self._hold = hold  # True: it will call flush() (on the loop, at the end of its turn)
        self._held: list[bytes] = []  # framed items put and not written yet, in order
        self._lock = threading.Lock()  # put() and flush() come from the loop and the pool's threads
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
        """Send ``item`` (or the stop marker, never held); True if it went without its images'
        names. BrokenPipeError if the worker is gone."""
        message = dumps(item)
        nameless = len(message) > self.limit and item is not None
        if nameless:
            assert item is not None
            refs = tuple(dataclasses.replace(ref, name="") for ref in item.images)
            message = dumps(dataclasses.replace(item, images=refs))
        with self._lock:  # within the pipe's share: whatever is held with it goes at once
            self._held.append(frame(message))
            if self._hold is None or item is None or not self._hold(self):
                self._write_held()
        return nameless

    def flush(self) -> None:
        """Write the items held back. BrokenPipeError (or EBADF once closed): the worker is gone,
        and so are they (its chunks, these with them, go back to the ledger: ``PipelinePool``)."""
        with self._lock:
            self._write_held()

    def _write_held(self) -> None:
        data = b"".join(self._held)  # one item: that item itself, not a copy
        self._held.clear()
        if data:
            written = os.write(self._fd, data)  # in one write and one Python call
            while written < len(data):  # a signal cut it short
                written += os.write(self._fd, memoryview(data)[written:])

    def close(self) -> None:
        with self._lock:
            self._fd = -1
            self._held.clear()
        self.conn.close()


class WriteCoalescer:
    """Inbox writes made on the loop, held to the end of its turn: the chunks one turn of the loop
    hands a worker (the pushes it read, the answers that freed credit) go in one write, and the
    worker wakes once for them and reads them in one read (``stage.gather``). Writes made in any
    other thread (the watcher's, a stop's) go at once, with whatever was held before them."""

    def __init__(self, to_loop: LoopHandoff) -> None:
        self._to_loop = to_loop
        self._due: dict[Inbox, None] = {}  # inboxes holding items, in the order they were first held; loop only

    def hold(self, inbox: Inbox) -> bool:
        """``Inbox``'s ``hold``: True if ``inbox`` will be flushed at the end of this turn (the
        caller is the loop), False if it must write now."""
        if not self._to_loop.on_loop():
            return False
        if not self._due:
            self._to_loop.soon(self._flush)
        self._due[inbox] = None
        return True

    def _flush(self) -> None:
        due, self._due = self._due, {}
        for inbox in due:
            try:
                inbox.flush()
            except OSError:  # the worker is gone: the watcher hands its chunks back, these too
                log.debug("a worker's inbox is closed; its chunks wait for its replacement")


class ResultReader:
    """The loop's end of a worker's result pipe: every whole message it holds, from one
    non-blocking read (``pipes.FrameReader``), decoded."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        os.set_blocking(conn.fileno(), False)  # the worker's end stays blocking: its own description
        self._frames = FrameReader(conn.fileno())

    def read(self) -> tuple[list[Any], bool]:
        """The messages the pipe holds now (maybe none), and whether it ended: the worker closed it
        or died (a message it left cut short is dropped), or a message would not decode."""
        frames, ended = self._frames.read()
        messages: list[Any] = []
        for data in frames:
            try:
                messages.append(loads(data))
            except Exception:
                log.exception("a message of %d bytes from a worker would not decode", len(data))
                return messages, True
        return messages, ended


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

    def soon(self, callback: Callable[[], None]) -> None:
        """``callback()`` on the loop at its next turn; from the loop's thread only."""
        self._loop.call_soon(callback)

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
