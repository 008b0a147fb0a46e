"""``PullResult`` on the local sockets of a server of several shards (``--shards``).

A shard's batches are its own: gRPC reaches shard 0 only, which refuses another shard's batch id
with where it is. So ``InferClient.pull`` (and ``AsyncInferClient.pull``), given the server's
local socket, pulls each batch on the socket of the shard its id names (``infer_proto.shards``):
one call per shard, read together with ``select`` by the calling thread (no thread of its own;
on the event loop for the asyncio client), results yielded in the order they arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc

from infer_client._protocol import MAX_RECEIVE_BYTES, InferError, PushedBatches
from infer_client.local import LocalSession
from infer_client.results import status_code
from infer_client.session import Metadata
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, decode_end, encode_call_start, frame
from infer_proto.shards import batch_shard, shard_socket

PULL = "/infer.v1.InferenceService/PullResult"
_CALL = 1
_CHUNK = 64 * 1024


def shard_count(path: str | os.PathLike[str], pushed: PushedBatches, timeout: float | None, metadata: Metadata) -> int:
    """How many shards the server on local socket ``path`` has (a Session's first reply says)."""
    probe = LocalSession(path, "inline", pushed, timeout, metadata)
    try:
        return probe.shards().count
    finally:
        probe.cancel()


class _Pull:
    """One PullResult call on one shard's socket: the request goes once the server asks for it."""

    def __init__(self, path: str, request: bytes, metadata: Metadata, timeout: float | None) -> None:
        self._request = frame(_CALL, Kind.MESSAGE, request) + frame(_CALL, Kind.HALF_CLOSE)
        self._received = bytearray()
        self.ended = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.sock.sendall(frame(_CALL, Kind.START, encode_call_start(PULL, metadata or ())))
        except OSError as exc:
            self.sock.close()
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"cannot reach the local socket {path}: {exc}") from None

    def fileno(self) -> int:
        return self.sock.fileno()

    def take(self) -> list[infer_pb2.ImageResult]:
        """What one receive brought (the socket is readable); sets ``ended`` at the call's end."""
        try:
            chunk = self.sock.recv(_CHUNK)
        except BlockingIOError:  # on the event loop: nothing after all
            return []
        except OSError as exc:
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc}") from None
        try:
            if not chunk:
                raise ConnectionError("the server closed the local socket")
            self._received += chunk
            return [result for kind, payload in self._frames() if (result := self._took(kind, payload)) is not None]
        except OSError as exc:  # a closed connection, or the request's send
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc}") from None

    def _took(self, kind: int, payload: bytes) -> infer_pb2.ImageResult | None:
        if kind == Kind.WANT and self._request:
            self.sock.sendall(self._request)
            self._request = b""
        elif kind == Kind.MESSAGE:
            return infer_pb2.ImageResult.FromString(payload)
        elif kind == Kind.END:
            self.ended = True
            code, details = decode_end(payload)
            if code:
                raise InferError(status_code(code), details)
        return None

    def _frames(self) -> Iterator[tuple[int, bytes]]:
        buffer, offset = self._received, 0
        while len(buffer) - offset >= HEADER.size:
            call, kind, length = HEADER.unpack_from(buffer, offset)
            if call != _CALL or length > MAX_RECEIVE_BYTES:
                raise InferError(grpc.StatusCode.INTERNAL, f"a frame of {length} bytes for call {call}")
            if len(buffer) - offset - HEADER.size < length:
                break
            yield kind, bytes(buffer[offset + HEADER.size : offset + HEADER.size + length])
            offset += HEADER.size + length
        del buffer[:offset]


def _calls(
    path: str | os.PathLike[str], batch_ids: Sequence[str], shards: int, metadata: Metadata, timeout: float | None
) -> list[_Pull]:
    """One call per shard named by ``batch_ids``; an id naming no shard goes to shard 0, which
    answers NOT_FOUND as for any unknown id."""
    by_shard: dict[int, list[str]] = {}
    for batch_id in batch_ids:
        by_shard.setdefault(batch_shard(batch_id, shards) or 0, []).append(batch_id)
    calls: list[_Pull] = []
    try:
        for shard, ids in by_shard.items():
            request = infer_pb2.PullResultRequest(batch_ids=ids).SerializeToString()
            calls.append(_Pull(shard_socket(path, shard), request, metadata, timeout))
    except InferError:
        _close(calls)
        raise
    return calls


def _close(calls: list[_Pull]) -> None:
    for call in calls:
        with contextlib.suppress(OSError):
            call.sock.close()


def _expired(timeout: float | None) -> InferError:
    return InferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end of the pull within {timeout:g}s")


def pull_shards(
    path: str | os.PathLike[str], batch_ids: Sequence[str], shards: int, metadata: Metadata, timeout: float | None
) -> Iterator[infer_pb2.ImageResult]:
    """The results of ``batch_ids``, each pulled on its shard's local socket, as they arrive;
    ``timeout`` bounds the whole pull (DEADLINE_EXCEEDED), as gRPC's deadline does."""
    deadline = None if timeout is None else time.monotonic() + timeout
    calls = _calls(path, batch_ids, shards, metadata, timeout)
    try:
        while open_calls := [call for call in calls if not call.ended]:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _expired(timeout)
            for call in select.select(open_calls, [], [], left)[0]:
                yield from call.take()
    finally:
        _close(calls)


class _Arrivals:
    """What the event loop read from the calls' sockets, in order (``pull_shards_async``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> None:
        self._loop, self._timeout = loop, timeout
        self._deadline = None if timeout is None else loop.time() + timeout
        self.queue: asyncio.Queue[infer_pb2.ImageResult | _Pull | InferError] = asyncio.Queue()

    def readable(self, call: _Pull) -> None:
        try:
            for result in call.take():
                self.queue.put_nowait(result)
        except InferError as exc:
            call.ended = True
            self.queue.put_nowait(exc)
        if call.ended:
            self._loop.remove_reader(call.fileno())
            self.queue.put_nowait(call)  # the call's end, after what it brought

    async def next(self) -> infer_pb2.ImageResult | _Pull:
        left = None if self._deadline is None else self._deadline - self._loop.time()
        try:
            item = await asyncio.wait_for(self.queue.get(), left)
        except TimeoutError:
            raise _expired(self._timeout) from None
        if isinstance(item, InferError):
            raise item
        return item


async def pull_shards_async(
    path: str | os.PathLike[str], batch_ids: Sequence[str], shards: int, metadata: Metadata, timeout: float | None
) -> AsyncIterator[infer_pb2.ImageResult]:
    """``pull_shards`` on the event loop: each shard's socket read when the loop sees it readable."""
    loop = asyncio.get_running_loop()
    arrivals = _Arrivals(loop, timeout)
    calls = _calls(path, batch_ids, shards, metadata, timeout)
    try:
        for call in calls:
            call.sock.setblocking(False)
            loop.add_reader(call.fileno(), arrivals.readable, call)
        ended = 0
        while ended < len(calls):
            item = await arrivals.next()
            if isinstance(item, _Pull):
                ended += 1
            else:
                yield item
    finally:
        for call in calls:
            if call.sock.fileno() >= 0:
                loop.remove_reader(call.fileno())
        _close(calls)
