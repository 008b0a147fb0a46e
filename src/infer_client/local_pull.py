"""``PullResult``, and ``PushData`` with a request id, on the local sockets of a server of
several shards (``--shards``).

A shard's batches are its own: over gRPC the main process relays a pull of another shard's batch
to it (one more hop, and more of the main process), and a shard's socket refuses another shard's
batch id with where it is. So ``InferClient.pull`` (and ``AsyncInferClient.pull``), given the
server's local socket, pulls each batch on the socket of the shard its id names (``infer_proto.shards``):
one call per shard, read together (``poll`` in the calling thread, or tasks on the event loop),
results yielded in the order they arrive.

The server counts a result delivered once its socket took it, so nothing a call received is
dropped: a call that ends with an error (an expired batch id on one shard) ends the pull with that
error only after every result received before it, and every other shard's call, were read out.

A request id is one shard's (``request_shard``): ``InferClient.push`` with one, given the local
socket, pushes on that shard's socket (``push_on_shard``), where a session's push with the same id
goes too, so that a push repeated either way is one batch (over gRPC the main process relays it
to the same shard).

Every socket but the first must be served by the user that serves the first (``SO_PEERCRED``,
checked before anything is sent): another user who binds ``PATH.k`` while shard k is being
started again gets no start, no token and no batch ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import time
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import Any

import grpc

from infer_client._protocol import InferError, PushedBatches
from infer_client.local import CALL, LocalSession, _served_by, ended_with, read_frames, start_frame, unexpected
from infer_client.session import Metadata
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, frame
from infer_proto.shards import batch_shard, request_shard, shard_socket

PULL = "/infer.v1.InferenceService/PullResult"
PUSH = "/infer.v1.InferenceService/PushData"
_CHUNK = 64 * 1024
_QUEUED = 256  # results the asyncio pull holds unread: beyond them its sockets are not read


def shard_count(
    path: str | os.PathLike[str], pushed: PushedBatches, timeout: float | None, metadata: Metadata
) -> tuple[int, int]:
    """How many shards the server on local socket ``path`` has (a Session's first reply says), and
    the uid it runs as (every shard's socket must be served by it)."""
    probe = LocalSession(path, "inline", pushed, timeout, metadata)
    try:
        return probe.shards().count, probe.server_uid
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
    if isinstance(exc, TimeoutError):  # the socket's timeout: what is left of the call's
        return InferError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer on the local socket within the timeout")
    if isinstance(exc, OSError | asyncio.IncompleteReadError):
        return InferError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc!r}")
    return InferError(grpc.StatusCode.INTERNAL, f"a malformed reply on the local socket: {exc!r}")


def _expired(timeout: float | None, call: str = "pull") -> InferError:
    return InferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no end of the {call} within {timeout:g}s")


class _Pull:
    """One PullResult call on one shard's socket, read when ``poll`` says so (``pull_shards``); or
    another call whose replies ``parse`` reads (``push_on_shard``)."""

    def __init__(
        self, path: str, request: bytes, metadata: Metadata, timeout: float | None, uid: int, method: str = "",
        parse: Callable[[bytes], Any] = infer_pb2.ImageResult.FromString,
    ) -> None:  # fmt: skip
        self._request, self._parse = _sent(request), parse
        self._received = bytearray()
        self.ended = False
        self.error: InferError | None = None  # how the call ended, once its results were taken
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            _served_by(self.sock, uid)  # before anything is sent: no start, no token to another user
            self.sock.sendall(start_frame(method or PULL, metadata))
        except OSError as exc:
            self.sock.close()
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"cannot reach the local socket {path}: {exc}") from None

    def take(self) -> list[Any]:
        """The results one receive completed; at the call's end (or its failure), ``ended`` and
        ``error`` are set and what came before is still returned."""
        results: list[Any] = []
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
                    results.append(self._parse(payload))
                elif kind == Kind.END:
                    self.ended, self.error = True, ended_with(payload)
                    break
        except Exception as exc:  # noqa: BLE001 - a failure ends this call, after what it brought
            self.ended, self.error = True, _failed(exc)
        return results


def push_on_shard(
    path: str | os.PathLike[str], request: infer_pb2.PushDataRequest, sharding: tuple[int, int], metadata: Metadata,
    timeout: float | None,
) -> str:  # fmt: skip
    """``PushData`` of ``request`` (which has a request id) on the socket of the shard its id names:
    the batch id (``InferError`` as gRPC's call would raise it; ``timeout`` bounds the whole call,
    DEADLINE_EXCEEDED, however the answer trickles in)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    shard = request_shard(request.request_id, sharding[0])
    call = _Pull(shard_socket(path, shard), request.SerializeToString(), metadata, timeout, sharding[1], PUSH,
                 infer_pb2.PushDataReply.FromString)  # fmt: skip
    try:
        replies = []
        while not call.ended:
            if deadline is not None:
                if (left := deadline - time.monotonic()) <= 0:
                    raise _expired(timeout, "push")
                call.sock.settimeout(left)
            replies += call.take()
    finally:
        call.sock.close()
    if call.error is not None:
        raise call.error
    if len(replies) != 1:
        raise InferError(grpc.StatusCode.INTERNAL, f"{len(replies)} replies to a push on the local socket")
    return str(replies[0].batch_id)


def pull_shards(
    path: str | os.PathLike[str], batch_ids: Sequence[str], sharding: tuple[int, int], metadata: Metadata,
    timeout: float | None,
) -> Generator[infer_pb2.ImageResult, None, None]:  # fmt: skip
    """The results of ``batch_ids``, each pulled on its shard's local socket, as they arrive;
    ``sharding``: the shards and the uid that serves them (``shard_count``); ``timeout`` bounds
    the whole pull (DEADLINE_EXCEEDED), as gRPC's deadline does."""
    deadline = None if timeout is None else time.monotonic() + timeout
    calls: dict[int, _Pull] = {}
    try:
        for shard, request in _requests(batch_ids, sharding[0]).items():
            call = _Pull(shard_socket(path, shard), request, metadata, timeout, sharding[1])
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


Results = asyncio.Queue[infer_pb2.ImageResult | InferError | None]  # a pull's results, then each call's end


async def _pull_one(path: str, request: bytes, metadata: Metadata, uid: int, out: Results) -> None:
    """One shard's call on the event loop: its results into ``out``, then how it ended (an error,
    or None). ``out`` is bounded: while it is full the socket is not read, and the server waits."""
    ended: InferError | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        _served_by(writer.get_extra_info("socket"), uid)  # before anything is sent
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
    path: str | os.PathLike[str], batch_ids: Sequence[str], sharding: tuple[int, int], metadata: Metadata,
    timeout: float | None,
) -> AsyncGenerator[infer_pb2.ImageResult, None]:  # fmt: skip
    """``pull_shards`` on the event loop: one task per shard's call."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    out: Results = asyncio.Queue(_QUEUED)
    requests, uid = _requests(batch_ids, sharding[0]), sharding[1]
    tasks = [asyncio.ensure_future(_pull_one(shard_socket(path, k), r, metadata, uid, out))
             for k, r in requests.items()]  # fmt: skip
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
    out: Results, deadline: float | None,
    loop: asyncio.AbstractEventLoop, timeout: float | None,
) -> infer_pb2.ImageResult | InferError | None:  # fmt: skip
    try:
        return await asyncio.wait_for(out.get(), None if deadline is None else deadline - loop.time())
    except TimeoutError:
        raise _expired(timeout) from None
