"""Delivery cursors: one stream's view of the batches whose results it sends, exactly once.

A cursor lives on the event loop beside the ``BatchRegistry`` that hands it out and needs no locks.
Delivery is the same for every stream: ``take`` hands out completed outcomes (they are then
*leased*), the stream writes them and ``ack``s them; if the write fails or the stream is cancelled
it ``nack``s them and they go back, in their original place, for a later stream. A cancellation
that lands while a write is in flight is ambiguous (the bytes may have reached the client): the
outcomes go back too, so results are never lost and a client that re-pulls drops repeats by
(batch id, index).

* ``PullCursor`` (PullResult): a fixed set of batches; ``next`` until every image was delivered.
* ``SessionCursor`` (Session): open-ended. The stream ``add``s each batch it pushes and ``seal``s
  once the client stops pushing; it tells its client when a batch is complete (``completions``,
  then ``release`` once that was written), so a retried push whose results partly went out on
  another stream still ends, and a session that lives for hours holds only the batches it still
  owes results of.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
from collections.abc import Iterable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Self

from infer_server.messages import ImageOutcome

if TYPE_CHECKING:
    from infer_server.front.batches import Batch

_SEQ = itemgetter(0)  # a ready entry's completion sequence number


class Cursor:
    """What every stream does with its batches: ``take`` / ``ack`` / ``nack``, ``wait``, ``close``."""

    def __init__(self) -> None:
        self._batches: dict[str, Batch] = {}
        self._wake = asyncio.Event()

    def _watch(self, batch: Batch) -> None:
        self._batches[batch.batch_id] = batch
        batch.subscribers.add(self._wake)

    def take(self, limit: int | None = None) -> list[ImageOutcome]:
        """Hand out the completed outcomes not handed out yet (at most ``limit``), earliest first."""
        ready = [b for b in self._batches.values() if b.ready and not b.expired]
        taken: list[tuple[int, ImageOutcome]] = []
        if limit is None or sum(len(b.ready) for b in ready) <= limit:  # all of them: one sort
            for batch in ready:
                taken += batch.ready
                batch.ready = []
            taken.sort(key=_SEQ)
        else:
            while ready and len(taken) < limit:
                batch = min(ready, key=lambda b: b.ready[0][0])
                taken.append(heapq.heappop(batch.ready))
                if not batch.ready:
                    ready.remove(batch)
        for seq, outcome in taken:
            self._batches[outcome.batch_id].leases[outcome.index] = seq
        return [outcome for _, outcome in taken]

    async def wait(self) -> None:
        """Until something may have changed: an outcome recorded, a batch added, sealed, poked.

        Callers check their condition, then await this, with no await in between: the event is
        cleared at once, before anything else can run, so no wake-up is lost. Finding: a Session
        waited with ``asyncio.wait_for(cursor.wait(), ...)``, which runs this in a task of its own
        that starts a loop iteration later; a result recorded in between was cleared away with its
        wake-up, and the stream waited for good with results ready (4 clients pushing single
        batches as fast as they could lost one in a few thousand).
        """
        self._wake.clear()
        await self._wake.wait()

    def ack(self, outcomes: Iterable[ImageOutcome]) -> None:
        """The outcomes were written to the stream: delivered, never handed out again. Other
        streams on their batches are woken (they may now be able to end); this one is not: what it
        has just written leaves it nothing new to send (``woken`` stays as it was)."""
        acked: dict[str, Batch] = {}
        for outcome in outcomes:
            batch = acked[outcome.batch_id] = self._batches[outcome.batch_id]
            del batch.leases[outcome.index]
            batch.delivered += 1
        for batch in acked.values():
            batch.notify(but=self._wake)

    def hush(self) -> None:
        """Forget what woke the stream: it is about to look at everything (``woken`` then says
        whether anything changed since)."""
        self._wake.clear()

    @property
    def woken(self) -> bool:
        """Something may have changed since ``hush``: an outcome recorded or put back, a batch
        added, sealed, expired, another stream's delivery, a poke."""
        return self._wake.is_set()

    def nack(self, outcomes: Iterable[ImageOutcome]) -> None:
        """The stream could not send the outcomes: put them back, ahead of later completions."""
        for outcome in outcomes:
            batch = self._batches[outcome.batch_id]
            seq = batch.leases.pop(outcome.index)
            if not batch.expired:
                heapq.heappush(batch.ready, (seq, outcome))  # its original place: completion order holds
            batch.notify()

    def close(self) -> None:
        for batch in self._batches.values():
            batch.subscribers.discard(self._wake)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PullCursor(Cursor):
    """A PullResult stream's batches, fixed when it opens."""

    def __init__(self, batches: Iterable[Batch]) -> None:
        super().__init__()
        for batch in batches:
            self._watch(batch)

    @property
    def finished(self) -> bool:
        """Nothing more will be delivered from any of the batches."""
        return all(b.done for b in self._batches.values())

    async def next(self) -> ImageOutcome | None:
        """The earliest completed outcome not yet handed out, or None once all were delivered."""
        while True:
            taken = self.take(1)
            if taken:
                return taken[0]
            if self.finished:
                return None
            await self.wait()


class SessionCursor(Cursor):
    """A Session stream's batches: added as they are pushed, let go once their completion was sent."""

    def __init__(self) -> None:
        super().__init__()
        self._repeats: collections.Counter[str] = collections.Counter()  # added again while held
        self._open = True

    def add(self, batch: Batch, wake: bool = True) -> None:
        """Deliver ``batch``'s results on this stream too. ``wake=False``: the stream has nothing to
        send for it until it has results. Added again while held (a push repeated with its
        request_id), it is reported complete once more after its first completion was released."""
        if batch.batch_id in self._batches:
            self._repeats[batch.batch_id] += 1
        else:
            self._watch(batch)
        if wake or batch.ready or batch.done:
            self._wake.set()

    def seal(self) -> None:
        """No more batches will be added: the stream may end once these are delivered."""
        self._open = False
        self._wake.set()

    def poke(self) -> None:
        """Wake ``wait`` (the stream has something else to send)."""
        self._wake.set()

    @property
    def holds_batches(self) -> bool:
        """Some batch's results or completion are still to be sent."""
        return bool(self._batches)

    @property
    def finished(self) -> bool:
        """Sealed, and every batch's completion was sent and released."""
        return not self._open and not self._batches

    def completions(self, taken: Sequence[ImageOutcome]) -> list[str]:
        """Batches of which nothing is left to deliver once ``taken`` (just handed out) is written."""
        mine: dict[str, int] = {}
        for outcome in taken:
            mine[outcome.batch_id] = mine.get(outcome.batch_id, 0) + 1
        return [
            b.batch_id for b in self._batches.values()
            if b.expired or (not b.ready and b.delivered + mine.get(b.batch_id, 0) == b.size)
        ]  # fmt: skip

    def release(self, batch_ids: Iterable[str]) -> None:
        """Their completion was written: let the batches go (a repeated one after its last repeat)."""
        for batch_id in batch_ids:
            if self._repeats[batch_id]:
                self._repeats[batch_id] -= 1
                continue
            self._repeats.pop(batch_id, None)
            batch = self._batches.pop(batch_id, None)
            if batch is not None:
                batch.subscribers.discard(self._wake)
