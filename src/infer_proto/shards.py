"""Which shard holds what, when the server runs several (``infer-server serve --shards K``).

A shard is one of the server's data planes: its own admission, batch registry, workers and local
socket (``<path>`` for shard 0, ``<path>.1`` … for the others). The client library and the server
agree on two rules, both computed from the id alone, so neither needs to ask the other:

* a **batch id** begins with its shard's number as one hex digit (K is at most 16);
* a **request id** belongs to shard ``crc32(request_id) mod K``: a push repeated with its request
  id reaches the shard that holds the first one, whichever connection it is sent on.

With one shard nothing changes: batch ids are random throughout and any request id is shard 0's.
"""

from __future__ import annotations

import os
import threading
import zlib

MAX_SHARDS = 16


def request_shard(request_id: str, shards: int) -> int:
    """The shard a request id belongs to."""
    return zlib.crc32(request_id.encode()) % shards if shards > 1 else 0


def batch_shard(batch_id: str, shards: int) -> int | None:
    """The shard whose batch id this is, or None if it names none of ``shards``."""
    if shards <= 1:
        return 0
    try:
        index = int(batch_id[:1], 16)
    except ValueError:
        return None
    return index if index < shards else None


def new_batch_id(shard: int, shards: int) -> str:
    """A fresh batch id (32 hex digits, 124 of its bits random when sharded) of ``shard``."""
    random = _ENTROPY.take(16).hex()
    return f"{shard:x}{random[1:]}" if shards > 1 else random


class _Entropy:
    """The operating system's random bytes (``os.urandom``), drawn 4 KiB at a time and handed out
    once each, whichever thread asks: a batch id takes 16, so one system call per 256 ids instead
    of one per id. A process forked from this one starts with none (it must never hand out its
    parent's)."""

    def __init__(self, draw: int = 4096) -> None:
        self._draw = draw
        self._bytes, self._next, self._lock = b"", 0, threading.Lock()
        os.register_at_fork(after_in_child=self.forget)

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._next + n > len(self._bytes):
                self._bytes, self._next = os.urandom(max(n, self._draw)), 0
            start = self._next
            self._next += n
            return self._bytes[start : start + n]

    def forget(self) -> None:
        self._bytes, self._next, self._lock = b"", 0, threading.Lock()


_ENTROPY = _Entropy()


def shard_socket(path: str | os.PathLike[str], shard: int) -> str:
    """The local socket of ``shard`` when shard 0's is ``path``."""
    return os.fspath(path) if shard == 0 else f"{os.fspath(path)}.{shard}"
