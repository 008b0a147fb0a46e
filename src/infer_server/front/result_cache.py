"""The result cache: an image's answer by the hash of its bytes, evicted by LRU-K.

Used by ``front.server`` in the server's main process, on the event loop (no locks), when
``--result-cache-entries`` is set. A push's images are hashed (BLAKE2b of the encoded bytes, read
through the front's descriptor of the batch file, in a thread); an image whose key is cached is
answered at once, marked ``cached``, and only the others go to the workers. Answers that came back
OK are stored.

The key is the image's hash, the models that answered (their names and versions, as the workers
reported them at start: another version is another key, so a changed model never serves an old
entry) and the caller's identity: one caller can never learn from a fast or ``cached`` answer that
another pushed the same image.

LRU-K (K = 2 by default; O'Neil, O'Neil and Weikum, 1993): an entry's rank is the time of its K-th
most recent use. Entries used fewer than K times rank below every other and go first, least
recently used first, so a burst of images seen once — a scan — replaces other images seen once and
never the ones that keep coming back, which plain LRU (K = 1) loses to any scan longer than the
cache. The use times of recently evicted keys are kept (as many keys as the cache holds entries),
so an image that comes back soon after it was evicted counts its earlier uses: a new set of
repeated images can still take the place of an old one. Bounded by entries and by bytes (an
entry's size is an estimate of what it holds).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import os
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from infer_server.messages import Code, ImageOutcome, ImageRef, replaced

if TYPE_CHECKING:
    from infer_server.front.handoff import BatchFile


@dataclass(eq=False)
class _Entry:
    value: Any
    size: int
    uses: list[int] = field(default_factory=list)  # the last K use times, oldest first

    def rank(self, k: int) -> int:
        """The K-th most recent use (valid once used K times)."""
        return self.uses[-k]


class LRUKCache:
    """``get``/``put`` with LRU-K eviction, bounded by ``max_entries`` and ``max_bytes``."""

    def __init__(self, max_entries: int, max_bytes: int, k: int = 2) -> None:
        if max_entries < 1 or max_bytes < 1 or k < 1:
            raise ValueError("max_entries, max_bytes and k must be at least 1")
        self.max_entries, self.max_bytes, self.k = max_entries, max_bytes, k
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self._clock = itertools.count()
        self._entries: dict[Hashable, _Entry] = {}
        self._young: OrderedDict[Hashable, None] = OrderedDict()  # used < K times, least recent first
        self._old: list[tuple[int, int, Hashable]] = []  # heap of (K-th use, tiebreak, key); stale ones skipped
        self._tiebreak = itertools.count()
        # The use times of recently evicted keys (at most max_entries of them): a key that comes back
        # soon after it was evicted keeps its history, so a new hot set reaches K uses and can take
        # the place of an old one (LRU-K's retained information).
        self._history: OrderedDict[Hashable, list[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def get(self, key: Hashable) -> Any | None:
        """The cached value (a use), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self._use(key, entry)
        return entry.value

    def put(self, key: Hashable, value: Any, size: int) -> None:
        """Store ``value`` (``size`` bytes) under ``key`` (a use). A new entry gets room first: the
        victims are chosen among the entries already there, never the one coming in."""
        if size > self.max_bytes:
            return
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._young.pop(key, None)  # its heap records go stale and are skipped
            self.bytes -= entry.size
        while self._entries and (len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes):
            self._evict()
        if entry is None:
            entry = _Entry(value, size, self._history.pop(key, []))
        entry.value, entry.size = value, size
        self._entries[key] = entry
        self.bytes += size
        self._use(key, entry)

    def _use(self, key: Hashable, entry: _Entry) -> None:
        entry.uses.append(next(self._clock))
        del entry.uses[: -self.k]
        if len(entry.uses) < self.k:
            self._young[key] = None
            self._young.move_to_end(key)
            return
        self._young.pop(key, None)
        heapq.heappush(self._old, (entry.rank(self.k), next(self._tiebreak), key))
        if len(self._old) > 4 * max(16, len(self._entries)):  # every use adds a record: drop stale ones
            self._old = [r for r in self._old if self._current(r)]
            heapq.heapify(self._old)

    def _current(self, record: tuple[int, int, Hashable]) -> bool:
        entry = self._entries.get(record[2])
        return entry is not None and len(entry.uses) >= self.k and entry.rank(self.k) == record[0]

    def _evict(self) -> None:
        if self._young:
            key, _ = self._young.popitem(last=False)
        else:
            while True:
                record = heapq.heappop(self._old)
                if self._current(record):  # not a stale record: the entry's current rank
                    key = record[2]
                    break
        entry = self._entries.pop(key)
        self.bytes -= entry.size
        self.evictions += 1
        self._history[key] = entry.uses
        if len(self._history) > self.max_entries:
            self._history.popitem(last=False)


_READ = 1 << 20  # hash an image in pieces of this size: a large one is never copied whole


def file_digest(fd: int, ref: ImageRef) -> bytes:
    """BLAKE2b-128 of one image's bytes, read from the batch file's descriptor (the same digest
    as ``stage.worker.image_digest`` of the same bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    offset, end = ref.offset, ref.offset + ref.size
    while offset < end:
        piece = os.pread(fd, min(_READ, end - offset), offset)
        if not piece:
            break  # truncated under us: the worker reports it; this key will simply not match
        digest.update(piece)
        offset += len(piece)
    return digest.digest()


def _size(outcome: ImageOutcome) -> int:
    """What an entry holds, roughly: a fixed cost plus each detection and its attributes."""
    return 200 + sum(120 + 60 * len(d.attributes) for d in outcome.detections)


Key = tuple[bytes, tuple[object, ...], str]  # image digest, models, caller


class ResultCache:
    """The server's cache: keys from image bytes, models and caller; hits answered as outcomes."""

    def __init__(self, max_entries: int, max_bytes: int, k: int = 2) -> None:
        self.lru = LRUKCache(max_entries, max_bytes, k)
        self.models: tuple[object, ...] = ()  # what answers: set once the workers reported their models
        self._pending: dict[tuple[str, int], Key] = {}  # (batch id, index) -> key, until answered

    def keys(self, file: BatchFile, caller: str) -> list[Key]:
        """Every image's key (blocking: reads the images; run it in a thread)."""
        return [(file_digest(file.file.fd, ref), self.models, caller) for ref in file.images]

    def split(self, batch_id: str, file: BatchFile, keys: list[Key]) -> tuple[list[ImageOutcome], list[ImageRef]]:
        """The batch's cached answers (as outcomes of this batch, marked ``cached``) and the images
        left for the workers, whose keys are kept until their answers come back (on the loop)."""
        hits, misses = [], []
        for ref, key in zip(file.images, keys, strict=True):
            stored = self.lru.get(key)
            if stored is None:
                misses.append(ref)
                self._pending[(batch_id, ref.index)] = key
            else:
                hits.append(replaced(stored, batch_id=batch_id, index=ref.index, name=ref.name,
                                     timings_ms=(), worker=-1, cached=True))  # fmt: skip
        return hits, misses

    def forget(self, batch_id: str, refs: list[ImageRef]) -> None:
        """The batch was not submitted after all."""
        for ref in refs:
            self._pending.pop((batch_id, ref.index), None)

    def store(self, outcome: ImageOutcome) -> None:
        """An image answered by a worker: an OK answer is cached under its key, if the bytes the
        worker read are the bytes the key was made of (``outcome.digest``): a client that rewrote
        its file between the two reads gets its answer, and nothing is cached."""
        key = self._pending.pop((outcome.batch_id, outcome.index), None)
        if key is None or outcome.code != Code.OK or outcome.digest != key[0]:
            return
        # During a model change, a worker still on the old versions may answer: that answer is
        # not one of the models the key names.
        if outcome.models == (key[1][-1] if key[1] else ()):
            self.lru.put(key, outcome, _size(outcome))

    def reset(self, models: tuple[object, ...]) -> None:
        """The workers now run other models: nothing cached before can answer for them."""
        if models != self.models:
            self.models = models
            self.lru = LRUKCache(self.lru.max_entries, self.lru.max_bytes, self.lru.k)
