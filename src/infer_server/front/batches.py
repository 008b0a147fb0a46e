"""The batch registry: ids, admission, result buffers and exactly-once delivery to PullResult streams.

Lives in the server's main process and is only ever touched from the asyncio event loop (the
pool calls back on the loop), so it needs no locks: nothing here awaits between reading and
updating state. The streams read the batches through cursors (``front.cursors``).

Life of a batch:
  reserve()  PushData passed the cheap checks: a batch id is assigned, the request_id is bound to
             it (a concurrent retry waits on ``Reservation.ready``), admission is charged
             (images and bytes in flight, the server's and the caller's; beyond the bounds ->
             ``Overloaded``).
  activate() the batch file is validated: the batch becomes visible to PullResult.
  record()   one ImageOutcome per image, in completion order, into the batch's ready heap (bounded
             by the batch's image count: duplicates are dropped, so it cannot grow past it).
  finish     every image answered: admission is released and ``on_finished`` runs (deletes the
             server's staging copy). The batch stays for ``result_ttl_s`` so results not yet
             pulled can be pulled later; then it expires and its id answers NOT_FOUND. A caller
             that holds more finished batches than its quota loses its own oldest first; past
             the server's bound, the largest holder's oldest go: never another caller's first.

Ownership: every batch belongs to the identity that pushed it (``front.identity``). A request_id
is the caller's own (two callers may use the same one), and another caller's batch id answers
NOT_FOUND exactly as an unknown one, so ids can be neither taken nor probed.

Delivery: a stream takes an outcome (it is then *leased*), writes it, and acks it; if the write
fails or the stream is cancelled, it nacks it and the outcome goes back for a later stream. A
cancellation that lands while a write is in flight is ambiguous (the bytes may have reached the
client): the outcome goes back too, so results are never lost and a client that re-pulls drops
repeats by (batch id, index). A stream ends when every image of its batches has been delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from infer_proto import infer_pb2
from infer_proto.shards import batch_shard, new_batch_id
from infer_server.front.caller_usage import CallerUsage
from infer_server.front.cursors import PullCursor, SessionCursor
from infer_server.front.errors import Conflict, Overloaded, Refused, Unavailable, UnknownBatch
from infer_server.front.handoff import BatchFile
from infer_server.front.identity import ANONYMOUS
from infer_server.messages import Code, ImageOutcome, ImageRef

log = logging.getLogger(__name__)


def request_fingerprint(request: infer_pb2.PushDataRequest) -> bytes:
    """What makes a push the same push: its image sizes and names.

    Not the path, nor whether the bytes come inline or in a file: a client library that retries
    writes the same images into a new batch file, or sends them inline when the shared tmpfs is
    full. Request ids are each caller's own (``BatchRegistry.reserve``); this stops a caller's own
    request_id reused by mistake for another request."""
    names = request.names if any(request.names) else ()  # no names and every name empty are the same
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{len(request.sizes)}:{len(names)}".encode())
    for part in (*map(str, request.sizes), *names):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no two lists run together
        digest.update(encoded)
    return digest.digest()


@dataclass(eq=False)
class Batch:
    batch_id: str
    request_id: str
    images: tuple[ImageRef, ...]
    total_bytes: int
    deadline: float  # time.monotonic() based
    owner: str = ANONYMOUS  # the identity that pushed it
    file: BatchFile | None = None
    answered: set[int] = field(default_factory=set)
    ready: list[tuple[int, ImageOutcome]] = field(default_factory=list)  # heap by completion seq
    leases: dict[int, int] = field(default_factory=dict)  # image index -> seq, handed out, not acked
    delivered: int = 0
    finished_at: float | None = None
    expired: bool = False
    subscribers: set[asyncio.Event] = field(default_factory=set)
    size: int = field(init=False)  # len(images), read several times per image answered

    def __post_init__(self) -> None:
        self.size = len(self.images)

    @property
    def done(self) -> bool:
        """Nothing more will ever be delivered from this batch."""
        return self.expired or self.delivered == self.size

    def notify(self, but: asyncio.Event | None = None) -> None:  # wakes every stream on it but ``but``
        for event in self.subscribers:
            if event is not but:
                event.set()


@dataclass(eq=False)
class Reservation:
    batch: Batch
    is_new: bool  # False: a retry of an earlier request_id; await ``ready`` and reuse its id
    ready: asyncio.Future[Batch] | None  # None without a request_id: no retry can wait for it
    fingerprint: bytes = b""  # of the request the request_id was first used with


@dataclass(frozen=True)
class Quota:
    """What one identity may hold at once (each bound also applies server-wide)."""

    inflight_images: int
    inflight_bytes: int
    retained_batches: int = 4096


@dataclass(eq=False)
class _Usage:
    """What one identity holds now; dropped when it holds nothing."""

    images: int = 0
    bytes: int = 0
    finished: OrderedDict[str, Batch] = field(default_factory=OrderedDict)  # in finish order

    @property
    def idle(self) -> bool:
        return not (self.images or self.bytes or self.finished)


def _holding(usage: _Usage) -> tuple[int, float]:
    if not usage.finished:
        return (0, 0.0)
    oldest = next(iter(usage.finished.values())).finished_at
    return (len(usage.finished), -(oldest or 0.0))


class BatchRegistry:
    def __init__(
        self,
        *,
        max_inflight_images: int,
        max_inflight_bytes: int,
        result_ttl_s: float,
        deadline_grace_s: float = 30.0,
        max_retained_batches: int = 16384,
        quota: Quota | None = None,
        on_finished: Callable[[Batch], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        """``shard``: this registry's shard and the server's number of them (``--shards``): its
        batch ids name it, and an id that names another one is refused, not unknown."""
        self.max_inflight_images = max_inflight_images
        self.max_inflight_bytes = max_inflight_bytes
        self.quota = quota or Quota(max_inflight_images, max_inflight_bytes, max_retained_batches)
        self._ttl = result_ttl_s
        self._grace = deadline_grace_s
        self._max_retained = max_retained_batches
        self._on_finished = on_finished
        self._clock = clock
        self.shard, self.shards = shard
        self._batches: dict[str, Batch] = {}  # active and finished, visible to PullResult
        self._requests: dict[tuple[str, str], Reservation] = {}  # (owner, request_id) -> first reservation
        self._finished: OrderedDict[str, Batch] = OrderedDict()  # in finish order, for expiry
        self._usage: dict[str, _Usage] = {}  # by owner
        self._seq = itertools.count()
        self.inflight_images = 0
        self.inflight_bytes = 0
        self.peers: CallerUsage | None = None  # with shards and per-caller quotas: each caller's work on the others
        self._idle = asyncio.Event()
        self._idle.set()

    def reserve(
        self, request_id: str, images: tuple[ImageRef, ...], total_bytes: int, deadline: float,
        fingerprint: bytes = b"", owner: str = ANONYMOUS,
    ) -> Reservation:  # fmt: skip
        """Assign a batch id and charge admission, or return the reservation of an earlier retry.

        A request_id is bound to the request it first came with (its ``fingerprint``) and to its
        caller: a different request under the same id is refused (``Conflict``) rather than handed
        the first one's batch; another caller's same id is another request altogether.
        """
        key = (owner, request_id)
        if request_id and key in self._requests:
            earlier = self._requests[key]
            if earlier.fingerprint != fingerprint:
                raise Conflict("this request_id was already used for a different request")
            return Reservation(earlier.batch, is_new=False, ready=earlier.ready, fingerprint=fingerprint)
        n = len(images)
        self._admit(owner, n, total_bytes)
        usage = self._usage.setdefault(owner, _Usage())
        usage.images += n
        usage.bytes += total_bytes
        if self.peers is not None:
            self.peers.add(owner, n, total_bytes)
        self.inflight_images += n
        self.inflight_bytes += total_bytes
        self._idle.clear()
        batch = Batch(new_batch_id(self.shard, self.shards), request_id, images, total_bytes, deadline, owner)
        # Only a retry under the same request_id waits for the batch to be accepted.
        future = asyncio.get_running_loop().create_future() if request_id else None
        reservation = Reservation(batch, is_new=True, ready=future, fingerprint=fingerprint)
        if request_id:
            self._requests[key] = reservation
        return reservation

    def _admit(self, owner: str, images: int, total_bytes: int) -> None:
        """Refuse (``Overloaded``) a batch that would exceed the server's or its caller's bounds."""
        if self.inflight_images + images > self.max_inflight_images:
            raise Overloaded(
                f"server is at capacity ({self.inflight_images} of {self.max_inflight_images} images "
                "in flight); retry later"
            )
        if self.inflight_bytes + total_bytes > self.max_inflight_bytes:
            raise Overloaded("server is at capacity (bytes in flight); retry later")
        held, held_bytes = self._held(owner)
        if held + images > self.quota.inflight_images or held_bytes + total_bytes > self.quota.inflight_bytes:
            raise Overloaded(
                f"this caller has {held} images ({held_bytes} bytes) in flight, its quota is "
                f"{self.quota.inflight_images} ({self.quota.inflight_bytes} bytes); retry later"
            )

    def _held(self, owner: str) -> tuple[int, int]:
        """The images and bytes ``owner`` has in flight: here, and on the other shards if they count together."""
        usage = self._usage.get(owner) or _Usage()
        if self.peers is None:
            return usage.images, usage.bytes
        images, nbytes = self.peers.elsewhere(owner)
        return usage.images + images, usage.bytes + nbytes

    def bytes_budget_spent(self, owner: str) -> str | None:
        """Why a push of ``owner`` cannot be admitted whatever its size (the server's or the caller's
        in-flight bytes are at their bound), or None: ``front.gate`` asks before receiving it."""
        if self.inflight_bytes >= self.max_inflight_bytes:
            return "server is at capacity (bytes in flight); retry later"
        held_bytes = self._held(owner)[1]
        if held_bytes >= self.quota.inflight_bytes:
            return f"this caller has {held_bytes} bytes in flight, its quota; retry later"
        return None

    def discard(self, batch_id: str) -> None:
        """A finished batch whose results were all delivered to a call that nobody can repeat (an
        Open Inference Protocol request): it goes now, not at its TTL, so it never pushes out
        results still waiting to be pulled."""
        batch = self._batches.get(batch_id)
        if batch is not None and batch.finished_at is not None and batch.done:
            self._forget(batch)

    def activate(self, reservation: Reservation, file: BatchFile) -> None:
        """The batch file is valid: make the batch pullable and wake any retry waiting on it."""
        batch = reservation.batch
        batch.file = file
        self._batches[batch.batch_id] = batch
        if reservation.ready is not None:
            reservation.ready.set_result(batch)

    def abandon(self, reservation: Reservation, exc: BaseException) -> None:
        """The batch failed validation: undo admission and the request_id binding."""
        batch = reservation.batch
        self._release(batch)
        if batch.request_id:
            self._requests.pop((batch.owner, batch.request_id), None)
        if not isinstance(exc, Exception):  # cancelled: a waiting retry should try again, not vanish
            exc = Unavailable("an earlier attempt of this request was cancelled; retry")
        if reservation.ready is not None:
            reservation.ready.set_exception(exc)
            reservation.ready.exception()  # retrieved: only concurrent retries care about it

    def record(self, *outcomes: ImageOutcome) -> None:
        """Store images' terminal records (the pool hands each over once, in bursts, on the loop);
        the streams on each batch that got one are woken once."""
        got: dict[str, Batch] = {}
        for outcome in outcomes:
            batch = self._batches.get(outcome.batch_id)
            if batch is None or batch.finished_at is not None:
                log.debug("outcome for unknown or finished batch %s dropped", outcome.batch_id)
                continue
            if outcome.index in batch.answered or not 0 <= outcome.index < batch.size:
                log.warning("duplicate outcome for image %d of batch %s dropped", outcome.index, batch.batch_id)
                continue
            batch.answered.add(outcome.index)
            heapq.heappush(batch.ready, (next(self._seq), outcome))
            got[batch.batch_id] = batch
            if len(batch.answered) == batch.size:
                self._finish(batch)
        for batch in got.values():
            batch.notify()

    def fail_unanswered(self, batch: Batch, code: Code, message: str) -> None:
        """Answer every image not answered yet with ``code`` (pool refused the batch, or overdue)."""
        self.record(*(ImageOutcome.failed(batch.batch_id, ref, code, message)
                      for ref in batch.images if ref.index not in batch.answered))  # fmt: skip

    def subscribe(self, batch_ids: Iterable[str], owner: str = ANONYMOUS) -> PullCursor:
        """A delivery cursor over the given batches of ``owner``; ``UnknownBatch`` if any id is
        unknown, expired or another caller's (the same answer for all three)."""
        batches = []
        for batch_id in dict.fromkeys(batch_ids):  # de-duplicated, order kept
            batch = self._batches.get(batch_id)
            if batch is None and batch_shard(batch_id, self.shards) not in (self.shard, None):
                raise Refused(f"batch {batch_id[:64]!r} is shard {batch_shard(batch_id, self.shards)}'s: pull it "
                              "on that shard's local socket (the client library does so when given it)")
            if batch is None or batch.owner != owner:
                raise UnknownBatch(f"unknown or expired batch id {batch_id[:64]!r}")
            batches.append(batch)
        if not batches:
            raise UnknownBatch("no batch ids given")
        return PullCursor(batches)

    def open_session(self) -> SessionCursor:
        """An open delivery cursor: a Session stream adds each batch it pushes, then seals it."""
        return SessionCursor()

    def expire(self) -> None:
        """Forget finished batches past their TTL; answer overdue images DEADLINE_EXCEEDED."""
        now = self._clock()
        while self._finished:
            batch = next(iter(self._finished.values()))
            assert batch.finished_at is not None
            if now - batch.finished_at < self._ttl:
                break
            self._forget(batch)
        for batch in list(self._batches.values()):
            if batch.finished_at is None and now > batch.deadline + self._grace:
                log.warning("batch %s overdue; answering its missing images", batch.batch_id)
                self.fail_unanswered(batch, Code.DEADLINE_EXCEEDED, "no result before the batch deadline")

    def staged_paths(self) -> set[str]:
        """Staging files of batches still being worked on (the janitor must leave them)."""
        return {b.file.path for b in self._batches.values() if b.file and b.file.staged and b.finished_at is None}

    def staged_batches(self, tier: int) -> list[Batch]:
        """Unfinished batches staged in ``tier``, newest first (the ones the pool will read last)."""
        staged = [b for b in self._batches.values() if b.file and b.file.staged and b.file.tier == tier]
        return [b for b in reversed(staged) if b.finished_at is None]

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no image is in flight; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _finish(self, batch: Batch) -> None:
        batch.finished_at = self._clock()
        self._release(batch)
        self._finished[batch.batch_id] = batch
        usage = self._usage.setdefault(batch.owner, _Usage())
        usage.finished[batch.batch_id] = batch
        self._retain(usage)
        if self._on_finished is not None:
            try:
                self._on_finished(batch)
            except Exception:
                log.exception("on_finished hook failed for batch %s", batch.batch_id)

    def _retain(self, usage: _Usage) -> None:
        """Keep finished batches within the caller's quota (its own oldest go), then within the
        server's bound (the oldest of whoever holds the most go)."""
        while len(usage.finished) > self.quota.retained_batches:
            self._forget(next(iter(usage.finished.values())))
        while len(self._finished) > self._max_retained:
            # The largest holder pays; between equal holders, the one whose oldest result is oldest.
            largest = max(self._usage.values(), key=_holding)
            self._forget(next(iter(largest.finished.values())))

    def _release(self, batch: Batch) -> None:
        self.inflight_images -= batch.size
        self.inflight_bytes -= batch.total_bytes
        usage = self._usage[batch.owner]
        usage.images -= batch.size
        usage.bytes -= batch.total_bytes
        if self.peers is not None:
            self.peers.add(batch.owner, -batch.size, -batch.total_bytes)
        if usage.idle:
            del self._usage[batch.owner]
        if self.inflight_images == 0:
            self._idle.set()

    def _forget(self, batch: Batch) -> None:
        self._finished.pop(batch.batch_id, None)
        self._batches.pop(batch.batch_id, None)
        usage = self._usage.get(batch.owner)
        if usage is not None:
            usage.finished.pop(batch.batch_id, None)
            if usage.idle:
                del self._usage[batch.owner]
        key = (batch.owner, batch.request_id)
        bound = self._requests.get(key)
        if bound is not None and bound.batch is batch:
            del self._requests[key]
        batch.expired = True
        batch.ready.clear()
        batch.notify()
