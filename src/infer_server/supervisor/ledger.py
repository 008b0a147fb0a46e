"""Which images are still unanswered, and by which chunk: the bookkeeping behind exactly-once.

Used only by ``infer_server.supervisor.pool.PipelinePool`` in the server process, always under the
pool's lock — the ledger itself is not thread-safe and knows nothing of processes. It owns the
chunks waiting for a worker and the map from every open image to the chunk answering it. Every
terminal outcome, from a worker or made up by the pool (crash, deadline, shutdown), goes through
``resolve``: the first answer for an image is delivered, any later one is dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from infer_server.messages import Code, FileRef, ImageOutcome, ImageRef, ItemDone, WorkItem

log = logging.getLogger(__name__)

CRASHED = "worker crashed while processing this image"
PIPELINE_FAILED = "the pipeline failed on this image (out of memory?)"
EXPIRED = "deadline exceeded before processing"


@dataclass(eq=False)
class Chunk:
    item: WorkItem
    remaining: set[int]  # indices of its images not answered yet
    started: bool = False  # a worker that died had taken it (its images may have run)
    nameless: bool = False  # sent without its images' names: outcomes get them back in ``resolve``

    def open_refs(self) -> list[ImageRef]:
        return [r for r in self.item.images if r.index in self.remaining]


class ChunkLedger:
    def __init__(self, batch_size: int, max_attempts: int):
        self.batch_size, self.max_attempts = batch_size, max_attempts
        self.pending: collections.deque[Chunk] = collections.deque()  # waiting for a worker
        self._chunks: dict[int, Chunk] = {}  # every chunk with open images, by item id
        self._open: dict[tuple[str, int], int] = {}  # (batch id, image index) → item id answering it
        self._ids = itertools.count(1)

    @property
    def open_images(self) -> int:
        return len(self._open)

    def is_open(self, chunk: Chunk) -> bool:
        return self._chunks.get(chunk.item.item_id) is chunk

    def add_batch(
        self, batch_id: str, file: FileRef, images: Sequence[ImageRef], deadline: float, now: float, route: int = 0
    ) -> None:
        """Cut a batch into chunks of at most ``batch_size`` images, queued at the back."""
        for lo in range(0, len(images), self.batch_size):
            refs = tuple(images[lo : lo + self.batch_size])
            item = WorkItem(next(self._ids), batch_id, file, refs, deadline, submitted=now, route=route)
            self._add(Chunk(item, {r.index for r in refs}))

    def _add(self, chunk: Chunk, front: bool = False) -> None:
        self._chunks[chunk.item.item_id] = chunk
        for index in chunk.remaining:
            self._open[(chunk.item.batch_id, index)] = chunk.item.item_id
        (self.pending.appendleft if front else self.pending.append)(chunk)

    def refile(self, batch_id: str, file: FileRef | None) -> bool:
        """Point every open chunk of ``batch_id`` at ``file`` (the same bytes, moved), if none of
        them is in a worker's hands; False (nothing changed) otherwise, or if none is open.
        ``file`` None only asks whether it could."""
        chunks = [c for c in self._chunks.values() if c.item.batch_id == batch_id]
        waiting = {id(c) for c in self.pending}
        if not chunks or any(id(c) not in waiting for c in chunks):
            return False
        for chunk in chunks:
            if file is not None:
                chunk.item = dataclasses.replace(chunk.item, file=file)
        return True

    def resolve(self, outcome: ImageOutcome) -> ImageOutcome | None:
        """Record ``outcome`` if its image is still open and return it for delivery, else None."""
        item_id = self._open.pop((outcome.batch_id, outcome.index), None)
        if item_id is None:
            return None
        chunk = self._chunks[item_id]
        if chunk.nameless:
            name = next(r.name for r in chunk.item.images if r.index == outcome.index)
            outcome = dataclasses.replace(outcome, name=name)
        chunk.remaining.discard(outcome.index)
        if not chunk.remaining:
            del self._chunks[item_id]
        return outcome

    def answered(self, chunk: Chunk | None, done: ItemDone) -> list[ImageOutcome | None]:
        """``resolve`` of every outcome of ``done``, its worker's answer to ``chunk``; images it left
        open (a worker bug) are answered INTERNAL, never left open."""
        deliveries = [self.resolve(outcome) for outcome in done.outcomes]
        if chunk is not None and self.is_open(chunk):
            log.error("worker %d finished chunk %d with images unanswered", done.worker, done.item_id)
            deliveries += self.fail(chunk, Code.INTERNAL, "pipeline error")
        return deliveries

    def fail(self, chunk: Chunk, code: Code, message: str) -> list[ImageOutcome | None]:
        """Answer every open image of ``chunk`` with ``code`` and ``image N: message``."""
        batch_id = chunk.item.batch_id
        return [
            self.resolve(ImageOutcome.failed(batch_id, r, code, f"image {r.index}: {message}"))
            for r in chunk.open_refs()
        ]

    def requeue(self, chunk: Chunk, why: str = CRASHED) -> list[ImageOutcome | None]:
        """A chunk whose worker died: back to the head of the line, retried, or failed.

        Not started: nothing was tried, so it goes back unchanged. Started: its open images come
        back as single-image chunks with ``attempt + 1`` (a poison image then fails only itself),
        or are answered UNAVAILABLE ``image N: why`` once ``max_attempts`` is spent.
        """
        if not self.is_open(chunk):
            return []
        if not chunk.started:
            self.pending.appendleft(chunk)
            return []
        if chunk.item.attempt >= self.max_attempts:
            return self.fail(chunk, Code.UNAVAILABLE, why)
        del self._chunks[chunk.item.item_id]
        refs = chunk.open_refs()
        for r in reversed(refs):
            item = dataclasses.replace(chunk.item, item_id=next(self._ids), images=(r,), attempt=chunk.item.attempt + 1)
            self._add(Chunk(item, {r.index}), front=True)
        return []

    def expire(self, now: float) -> list[ImageOutcome | None]:
        """Answer DEADLINE_EXCEEDED for pending chunks whose deadline has passed."""
        expired = [c for c in self.pending if c.item.deadline < now]
        for chunk in expired:
            self.pending.remove(chunk)
        return [o for c in expired for o in self.fail(c, Code.DEADLINE_EXCEEDED, EXPIRED)]

    def fail_all(self, code: Code, message: str) -> list[ImageOutcome | None]:
        self.pending.clear()
        return [o for c in list(self._chunks.values()) for o in self.fail(c, code, message)]
