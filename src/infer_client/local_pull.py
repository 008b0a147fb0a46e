"""``PullResult`` on the local sockets of a server of several shards (``--shards``).

A shard's batches are its own: gRPC reaches shard 0 only, which refuses another shard's batch id
with where it is. So ``InferClient.pull`` (and ``AsyncInferClient.pull``), given the server's
local socket, pulls each batch on the socket of the shard its id names (``infer_proto.shards``):
one call per shard, read together (``poll`` in the calling thread, or tasks on the event loop),
results yielded in the order they arrive.

The server counts a result delivered once its socket took it, so nothing a call received is
dropped: a call that ends with an error (an expired batch id on one shard) ends the pull with that
error only after every result received before it, and every other shard's call, were read out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncGenerator, Generator, Sequence

import grpc

from infer_client._protocol import InferError, PushedBatches
from infer_client.local import CALL, LocalSession, ended_with, read_frames, start_frame, unexpected
from infer_client.session import Metadata
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, frame
from infer_proto.shards import batch_shard, shard_socket

PULL = "/infer.v1.InferenceService/PullResult"
_CHUNK = 64 * 1024
_QUEUED = 256  # results the asyncio pull holds unread: beyond them its sockets are not read


def shard_count(path: str | os.PathLike[str], pushed: PushedBatches, timeout: float | None, metadata: Metadata) -> int:
    """How many shards the server on local socket ``path`` has (a Session's first reply says)."""
    probe = LocalSession(path, "inline", pushed, timeout, metadata)
    try:
        return probe.shards().count
    finally:
        probe.cancel()


def _requests(batch_ids: Sequence[str], shards: int) -> dict[int, bytes]:
    """Each shard's PullResult request; an id naming no shard goes to shard 0, which answers
    NOT_FOUND as for any unknown id."""
    by_shard: dict[int, list[str]] = {}
    for batch_id in batch_ids:
        by_shard.setdefault(batch_shard(batch_id, shards) or 0, []).append(batch_id)
    return {shard: infer_pb2.PullResultRequest(batch_ids=ids).SerializeToString() for shard, ids in by_shard.items()}


def _sent(request: bytes) -> bytes:
    """The request and the half-close: what a call sends once the server asks (``WANT``)."""
    return frame(CALL, Kind.MESSAGE, request) + frame(CALL, Kind.HALF_CLOSE)


def _failed(exc: BaseException) -> InferError:
    if isinstance(exc, InferError):
        return exc
    if isinstance(exc, OSError | asyncio.IncompleteReadError):
        return InferError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc!r}")
    return InferError(grpc.StatusCode.INTERNAL, f"a malformed reply on the local socket: {exc!r}")


def _expired(timeout: float | None) -> InferError:
    return InferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end of the pull within {timeout:g}s")


class _Pull:
    """One PullResult call on one shard's socket, read when ``poll`` says so (``pull_shards``)."""

    def __init__(self, path: str, request: bytes, metadata: Metadata, timeout: float | None) -> None:
        self._request = _sent(request)
        self._received = bytearray()
        self.ended = False
        self.error: InferError | None = None  # how the call ended, once its results were taken
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self.sock.sendall(start_frame(PULL, metadata))
        except OSError as exc:
            self.sock.close()
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"cannot reach the local socket {path}: {exc}") from None

    def take(self) -> list[infer_pb2.ImageResult]:
        """The results one receive completed; at the call's end (or its failure), ``ended`` and
        ``error`` are set and what came before is still returned."""
        results: list[infer_pb2.ImageResult] = []
        try:
            chunk = self.sock.recv(_CHUNK)
            if not chunk:
                raise ConnectionError("the server closed the local socket")
            self._received += chunk
            for kind, payload in read_frames(self._received):
                if kind == Kind.WANT and self._request:
                    self.sock.sendall(self._request)
                    self._request = b""
                elif kind == Kind.MESSAGE:
                    results.append(infer_pb2.ImageResult.FromString(payload))
                elif kind == Kind.END:
                    self.ended, self.error = True, ended_with(payload)
                    break
        except Exception as exc:  # noqa: BLE001 - a failure ends this call, after what it brought
            self.ended, self.error = True, _failed(exc)
        return results


def pull_shards(
    path: str | os.PathLike[str], batch_ids: Sequence[str], shards: int, metadata: Metadata, timeout: float | None
) -> Generator[infer_pb2.ImageResult, None, None]:
    """The results of ``batch_ids``, each pulled on its shard's local socket, as they arrive;
    ``timeout`` bounds the whole pull (DEADLINE_EXCEEDED), as gRPC's deadline does."""
    deadline = None if timeout is None else time.monotonic() + timeout
    calls: dict[int, _Pull] = {}
    try:
        for shard, request in _requests(batch_ids, shards).items():
            call = _Pull(shard_socket(path, shard), request, metadata, timeout)
            calls[call.sock.fileno()] = call
        readable = select.poll()  # not select(): a client holding many files has descriptors past 1023
        for fd in calls:
            readable.register(fd, select.POLLIN)
        while any(not call.ended for call in calls.values()):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise _expired(timeout)
            for fd, _ in readable.poll(None if left is None else max(1, int(left * 1000))):
                yield from calls[fd].take()
                if calls[fd].ended:
                    readable.unregister(fd)
        if errors := [call.error for call in calls.values() if call.error is not None]:
            raise errors[0]
    finally:
        for call in calls.values():
            with contextlib.suppress(OSError):
                call.sock.close()


async def _pull_one(
    path: str, request: bytes, metadata: Metadata, out: asyncio.Queue[infer_pb2.ImageResult | InferError | None]
) -> None:
    """One shard's call on the event loop: its results into ``out``, then how it ended (an error,
    or None). ``out`` is bounded: while it is full the socket is not read, and the server waits."""
    ended: InferError | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(start_frame(PULL, metadata))
        pending = _sent(request)
        while True:
            call, kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
            if reason := unexpected(call, length):
                raise ValueError(reason)
            payload = await reader.readexactly(length)
            if kind == Kind.WANT and pending:
                writer.write(pending)
                await writer.drain()
                pending = b""
            elif kind == Kind.MESSAGE:
                await out.put(infer_pb2.ImageResult.FromString(payload))
            elif kind == Kind.END:
                ended = ended_with(payload)
                break
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a failure ends this call, after what it brought
        ended = _failed(exc)
    finally:
        if writer is not None:
            writer.close()
    await out.put(ended)


async def pull_shards_async(
    path: str | os.PathLike[str], batch_ids: Sequence[str], shards: int, metadata: Metadata, timeout: float | None
) -> AsyncGenerator[infer_pb2.ImageResult, None]:
    """``pull_shards`` on the event loop: one task per shard's call."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    out: asyncio.Queue[infer_pb2.ImageResult | InferError | None] = asyncio.Queue(_QUEUED)
    requests = _requests(batch_ids, shards)
    tasks = [asyncio.ensure_future(_pull_one(shard_socket(path, k), r, metadata, out)) for k, r in requests.items()]
    errors: list[InferError] = []
    try:
        for _ in tasks:  # each call puts its results, then one end
            while (item := await _next(out, deadline, loop, timeout)) is not None:
                if isinstance(item, InferError):
                    errors.append(item)
                    break
                yield item
        if errors:
            raise errors[0]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _next(
    out: asyncio.Queue[infer_pb2.ImageResult | InferError | None], deadline: float | None,
    loop: asyncio.AbstractEventLoop, timeout: float | None,
) -> infer_pb2.ImageResult | InferError | None:  # fmt: skip
    try:
        return await asyncio.wait_for(out.get(), None if deadline is None else deadline - loop.time())
    except TimeoutError:
        raise _expired(timeout) from None
