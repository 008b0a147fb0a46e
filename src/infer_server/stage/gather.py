"""A worker's dynamic batcher: which chunks it runs together as one model batch.

Clients that push one image each would otherwise cost a detector call, and a call of every
attribute model, on a batch of one. The pool lets a worker hold several small chunks on credit (up
to twice the batch size in images: ``supervisor.processes.WorkerProcess.has_credit``), so while it
runs one batch, the next chunks queue in its inbox (read a pipeful at a time, ``pipes.FrameReader``:
the pool writes the chunks of one turn of its loop at once). ``Gatherer.next_group`` takes the
next chunk, then every chunk already waiting behind it, in order, while they fit in ``batch_size``
images together and take the same route (stable, canary, shadow); while the batch is not full it
waits for more up to ``max_delay_s`` after the oldest chunk of the group was submitted (Triton's
``max_queue_delay_microseconds``; 0: only what is already waiting, which adds no latency), ending a
delay's length before the earliest deadline of the group, so no chunk expires waiting. Under load a
worker's inbox fills while it computes, so batches fill themselves.

A retry (``attempt`` > 1: its worker died under it) always runs alone: it may be the image that
kills workers, and it must take down nobody else's.

``Group`` runs the chunks as one: their images are numbered 0..n-1 for the pipeline (which knows one
batch id and unique indices), and every outcome goes back under its own batch id, index and name.
A single chunk runs exactly as it came.

Exactly once is unaffected: each chunk is answered by its own ``ItemDone``, and the worker's
``current`` names the last chunk of the group, so if the worker dies the pool counts every chunk
up to it as started (it sends them in order, the worker takes them in order).
"""

from __future__ import annotations

import collections
import math
import select
import time
from typing import TYPE_CHECKING

from infer_server.messages import STOP, Code, ImageOutcome, ImageRef, WorkItem, loads, replaced
from infer_server.pipes import FrameReader

if TYPE_CHECKING:
    from multiprocessing.connection import Connection


class Gatherer:
    """The chunks of a worker's inbox, grouped (``enabled`` False: one chunk at a time)."""

    def __init__(self, inbox: Connection, batch_size: int, max_delay_s: float = 0.0, enabled: bool = True) -> None:
        # ``inbox`` is read through its descriptor (``_frames``); held here, it stays open while this reads it.
        self.inbox, self.batch_size, self.max_delay_s, self.enabled = inbox, batch_size, max_delay_s, enabled
        self.stopped = False  # the stop marker came, or the pool closed the inbox
        self._waiting: collections.deque[WorkItem] = collections.deque()  # received, not yet grouped
        self._frames = FrameReader(inbox.fileno())  # a pipeful per read: every chunk the pool wrote at once
        self._unread: collections.deque[memoryview] = collections.deque()  # read, not decoded yet
        # Whether the inbox holds a chunk yet: one poll() call (Connection.poll builds a selector per call).
        self._readable = select.poll()
        self._readable.register(inbox.fileno(), select.POLLIN)

    def next_group(self) -> list[WorkItem]:
        """The next chunks to run as one batch; blocks until there is one; empty once stopped."""
        first = self._waiting.popleft() if self._waiting else self._receive(None)
        if first is None:
            return []
        group, images = [first], len(first.images)
        until = self._until(first, (first.submitted or time.monotonic()) + self.max_delay_s)
        while self.enabled and first.attempt == 1 and images < self.batch_size:
            if not self._waiting:
                item = self._receive(max(0.0, until - time.monotonic()))
                if item is None:
                    break
                self._waiting.append(item)
            following = self._waiting[0]
            if (following.route != first.route or following.attempt > 1
                    or images + len(following.images) > self.batch_size):  # fmt: skip
                break
            group.append(self._waiting.popleft())
            images += len(following.images)
            until = self._until(following, until)
        return group

    def _until(self, item: WorkItem, until: float) -> float:
        """When waiting for more must end: no later than ``until``, and a delay's length before
        ``item``'s deadline (a chunk is taken before its deadline, never run out of it)."""
        return min(until, item.deadline - self.max_delay_s)

    def _receive(self, timeout: float | None) -> WorkItem | None:
        """The inbox's next chunk, or None: none came within ``timeout`` (None: wait for one), or
        the stop marker or the inbox's end came (``stopped``)."""
        while not self._unread:
            if self.stopped or (timeout is not None and not self._readable.poll(math.ceil(timeout * 1000))):
                return None
            frames, ended = self._frames.read()  # the inbox blocks: this waits for bytes
            self._unread.extend(frames)
            self.stopped = ended and not frames  # the pool closed the inbox: as good as the stop marker
        item = loads(self._unread.popleft())
        if item is STOP:
            self.stopped = True
            return None
        return item  # type: ignore[no-any-return]


class Group:
    """Chunks run as one pipeline batch: ``add`` numbers their images, ``back`` returns an outcome
    to its own chunk, batch id, index and name (an error message's ``image N:`` too)."""

    def __init__(self, items: list[WorkItem]) -> None:
        self.single = len(items) == 1  # run as it came: nothing to renumber
        self.batch_id = items[0].batch_id if self.single else ""
        self._items = items
        self._owners: list[tuple[WorkItem, ImageRef]] = []

    def add(self, item: WorkItem, ref: ImageRef) -> ImageRef:
        """The ref under which the pipeline sees ``item``'s image ``ref``."""
        if self.single:
            return ref
        self._owners.append((item, ref))
        return replaced(ref, index=len(self._owners) - 1)

    def back(self, outcome: ImageOutcome, queue_ms: dict[int, float]) -> tuple[WorkItem, ImageOutcome]:
        """``outcome`` of the pipeline under its own chunk; an OK one of a group gets its chunk's
        queue time (``queue_ms`` by item id; a single chunk's was given to the pipeline)."""
        if self.single:
            return self._items[0], outcome
        item, ref = self._owners[outcome.index]
        message, prefix = outcome.message, f"image {outcome.index}:"
        if message.startswith(prefix):
            message = f"image {ref.index}:{message[len(prefix) :]}"
        timings = outcome.timings_ms
        if outcome.code == Code.OK and item.item_id in queue_ms:
            timings = (*timings, ("queue", queue_ms[item.item_id]))
        return item, replaced(
            outcome, batch_id=item.batch_id, index=ref.index, name=ref.name, message=message, timings_ms=timings
        )
