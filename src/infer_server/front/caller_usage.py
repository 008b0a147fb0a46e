"""What each caller has in flight on the other shards of a server (``--shards K``), so that a
per-caller quota (``--max-inflight-images-per-identity``, ``--max-inflight-bytes-per-identity``)
bounds the caller's images and bytes in flight on the whole server, not a K-th of it per shard: a
caller whose pushes all land on one shard (one Session does) gets its whole quota there.

One shared memory file (``memfd``), made by the main process before it starts a shard and handed
to every shard it starts: a header (a random salt), then a row per shard that only that shard
writes. A row is a count-min sketch of its shard's in-flight work by caller: ``DEPTH`` arrays of
``WIDTH`` buckets, each bucket two 64-bit counters (images, bytes); a caller's work is added to
one bucket per array, chosen by a salted BLAKE2b of its name, and taken off again when its batch
finishes. A shard admits a push against its own exact count plus, from every other row, the
smallest of the caller's buckets: never less than what the caller has in flight there; more only
if another caller shares its buckets in every array, which for ``n`` callers busy on a shard
happens with a probability of about ``(n / WIDTH) ** DEPTH`` (1e-5 for a hundred callers), and
the salt, drawn when the server starts, keeps callers from choosing names that do.

Each counter is one aligned 8-byte word written by one process, so a reader never sees half of
one. Two shards admitting the same caller at the same moment each see the other's count from
before: a caller can get over its quota by at most one batch per other shard, for as long as
those batches are in flight. A shard that exits leaves its row as it was; the main process clears
the row before it starts the shard again (its batches went with it).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from infer_server.settings import ServerSettings

WIDTH = 1 << 14  # buckets per array
DEPTH = 2  # arrays (hashes) per row
_HEADER = 8  # 64-bit words before the first row: the salt (2 words), the rest reserved
_ROW = DEPTH * WIDTH * 2  # 64-bit words per row: (images, bytes) per bucket
_MASK = WIDTH - 1
_CACHED = 4096  # callers whose buckets a process keeps computed


class CallerUsage:
    """A process's view of the table: it writes row ``shard`` and reads the others."""

    def __init__(self, fd: int, shards: int, shard: int) -> None:
        if not 0 <= shard < shards:
            raise ValueError(f"shard {shard} is not one of {shards}")
        self.fd, self.shards, self.shard = fd, shards, shard
        self._map = mmap.mmap(fd, size(shards))  # MAP_SHARED: what one process writes, the others read
        self._words = memoryview(self._map).cast("q")
        self._salt = bytes(self._map[:16])
        self._buckets: dict[str, tuple[int, ...]] = {}
        self._others = [row for row in range(shards) if row != shard]

    @classmethod
    def create(cls, shards: int) -> CallerUsage:
        """The main process's table (shard 0), in a new memory file the shards it starts inherit."""
        fd = os.memfd_create("infer-caller-usage", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size(shards))
            os.pwrite(fd, secrets.token_bytes(16), 0)
            return cls(fd, shards, 0)
        except BaseException:
            os.close(fd)
            raise

    def add(self, owner: str, images: int, nbytes: int) -> None:
        """This shard's in-flight work of ``owner`` changed by ``images`` and ``nbytes`` (negative: finished)."""
        words = self._words
        base = _HEADER + self.shard * _ROW
        for bucket in self._of(owner):
            words[base + bucket] += images
            words[base + bucket + 1] += nbytes

    def elsewhere(self, owner: str) -> tuple[int, int]:
        """What ``owner`` has in flight on the other shards, as images and bytes (never less than it has)."""
        if not self._others:
            return 0, 0
        words = self._words
        images = nbytes = -1
        for bucket in self._of(owner):
            here = there = 0
            for row in self._others:
                at = _HEADER + row * _ROW + bucket
                here += words[at]
                there += words[at + 1]
            images = here if images < 0 else min(images, here)
            nbytes = there if nbytes < 0 else min(nbytes, there)
        return images, nbytes

    def clear(self, shard: int) -> None:
        """Forget shard ``shard``'s row (it exited: its batches went with it). The main process's
        call, before it starts the shard again: no other process writes that row meanwhile."""
        start = (_HEADER + shard * _ROW) * 8
        self._map[start : start + _ROW * 8] = bytes(_ROW * 8)

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self.fd)

    def _of(self, owner: str) -> tuple[int, ...]:
        """The word offset of ``owner``'s bucket in each array of a row."""
        buckets = self._buckets.get(owner)
        if buckets is None:
            name = owner.encode("utf-8", "surrogatepass")
            digest = int.from_bytes(hashlib.blake2b(name, digest_size=8, key=self._salt).digest(), "little")
            buckets = tuple(2 * (d * WIDTH + ((digest >> (32 * d)) & _MASK)) for d in range(DEPTH))
            if len(self._buckets) >= _CACHED:
                self._buckets.clear()
            self._buckets[owner] = buckets
        return buckets


def size(shards: int) -> int:
    """Bytes of the table of ``shards`` shards (a memory file's pages are only made when written)."""
    return (_HEADER + shards * _ROW) * 8


def caller_quotas(settings: ServerSettings) -> bool:
    """Per-caller in-flight quotas are set: the shards then count each caller's work together."""
    return bool(settings.max_inflight_images_per_identity or settings.max_inflight_bytes_per_identity)
