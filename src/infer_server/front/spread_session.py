"""A gRPC Session of a server of several shards (``--shards``): each push on its shard.

Only the main process serves gRPC. A client on the local socket routes its session's pushes among
the shards itself (``infer_client.routed``); a gRPC client cannot, so the main process does it for
it: a push with a request id goes to the shard that owns the id (``request_shard``), the shard
the local socket's clients push it to, so one id is one batch on every transport; a push without
one goes to each shard in turn. A push for another shard is relayed there as a ``PushData``, and
its batch's results come back by a relayed ``PullResult`` (``front.shard_relay``); a push for the
main process is admitted here and its results read from the registry, as a pull reads them.

What the client sees is the Session protocol of ``front.session``: a push's answer before any of
its batch's results (a deferred one, ``defer_answer``, with its batch's first result or its
completion), each batch reported complete once nothing of it is left to deliver (in the reply of
its last result when that comes through this stream), the stream's end once the client
half-closed and every batch was reported, and an idle stream ended after ``--stream-idle-timeout``.
A result counts as delivered only once written to this stream (a relayed one is acknowledged to
its shard only then), so a stream that breaks loses nothing: what it did not send stays with its
batch, for a pull or a push repeated with its request id. A shard that exits ends the stream
UNAVAILABLE. Replies carry one result each here, where ``SessionProtocol`` gathers what is ready:
a gRPC client of a sharded server pays a little more of the main process per image, and has
every shard's workers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_proto import infer_pb2
from infer_server._wire import image_results
from infer_server.front.errors import Unavailable, Unreadable, status_for
from infer_server.front.identity import Identity
from infer_server.front.session import write_outcomes
from infer_server.front.shard_relay import DELIVERIES_PER_SESSION, PULL, PUSH, ToShard

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer

_RESULTS_FIELD = infer_pb2.SessionReply.DESCRIPTOR.fields_by_name["results"].number
_RESULTS_KEY = bytes([_RESULTS_FIELD << 3 | 2])  # a length-delimited field, numbered below 16


def _as_result(payload: bytes) -> bytes:
    """A serialized ``ImageResult`` as a ``SessionReply.results`` entry (appended to a reply)."""
    size, length = len(payload), bytearray()
    while size > 0x7F:
        length.append(size & 0x7F | 0x80)
        size >>= 7
    length.append(size)
    return _RESULTS_KEY + bytes(length) + payload


class SpreadSession:
    """One gRPC Session of the main process of several shards: ``await SpreadSession(...).run()``."""

    def __init__(self, context: Any, server: InferenceServer, identity: Identity, idle_timeout_s: float) -> None:
        assert server.shards is not None
        self._context, self._server, self._identity = context, server, identity
        self._relays = server.shards.relays
        self._idle_timeout_s = idle_timeout_s
        self._writing = asyncio.Lock()  # one reply at a time, from every batch's delivery
        self._deferred: dict[str, list[infer_pb2.PushAnswer]] = {}  # answers held until their batch has news
        self._tasks: set[asyncio.Task[None]] = set()  # a delivery per batch pushed
        self._pushing = False
        self._changed = asyncio.Event()  # a push was read, or a delivery ended
        self._relayed = asyncio.Semaphore(DELIVERIES_PER_SESSION)  # other shards' batches read at once

    async def run(self) -> None:
        """Serve the stream until the client half-closed and every batch was reported complete."""
        reader = asyncio.ensure_future(self._read())
        reader.add_done_callback(lambda _: self._changed.set())
        try:
            while True:
                self._changed.clear()
                for task in [t for t in self._tasks if t.done()]:
                    self._tasks.discard(task)
                    task.result()  # a delivery that failed (a shard exited) ends the stream with its error
                if reader.done():
                    reader.result()
                    if not self._tasks:
                        return
                await self._wait()
        finally:
            for task in (reader, *self._tasks):
                task.cancel()
            await asyncio.gather(reader, *self._tasks, return_exceptions=True)

    async def _wait(self) -> None:
        idle = not self._tasks and not self._pushing
        try:
            await asyncio.wait_for(self._changed.wait(), self._idle_timeout_s if idle else None)
        except TimeoutError:
            if not self._tasks and not self._pushing:
                raise Unavailable(f"session idle for {self._idle_timeout_s:g} s; open a new one") from None

    async def _read(self) -> None:
        while (request := await self._context.read()) is not grpc.aio.EOF:
            self._pushing = True
            try:
                await self._one(request)
            finally:
                self._pushing = False
                self._changed.set()

    async def _one(self, request: infer_pb2.SessionRequest | Unreadable) -> None:
        """Admit one push on its shard and deliver its batch here, or refuse it in-band."""
        if isinstance(request, Unreadable):  # this push alone fails; the session goes on
            status = infer_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=request.reason)
            await self._write(infer_pb2.SessionReply(answers=[infer_pb2.PushAnswer(tag=request.tag, status=status)]))
            return
        try:
            batch_id, images, relay = await self._push(request.push)
        except Exception as exc:
            code, message = status_for(exc, "Session push")
            status = infer_pb2.Status(code=code.value[0], message=message)
            await self._write(infer_pb2.SessionReply(answers=[infer_pb2.PushAnswer(tag=request.tag, status=status)]))
            return
        answer = infer_pb2.PushAnswer(tag=request.tag, batch_id=batch_id, image_count=images)
        if request.defer_answer:
            self._deferred.setdefault(batch_id, []).append(answer)
        else:
            await self._write(infer_pb2.SessionReply(answers=[answer]))
        task = asyncio.ensure_future(self._deliver(batch_id, images, relay))
        task.add_done_callback(lambda _: self._changed.set())
        self._tasks.add(task)

    async def _push(self, push: infer_pb2.PushDataRequest) -> tuple[str, int, ToShard | None]:
        """The batch id and images of the push, admitted on its shard, and that shard's relay (None:
        this process)."""
        relay = self._relays.place(push.request_id)
        if relay is None:
            batch = await self._server.push(push, self._context.peer(), self._identity)
            return batch.batch_id, batch.size, None
        replies: list[bytes] = []
        await relay.call(PUSH, self._context, push.SerializeToString(), _collect(replies))
        reply = infer_pb2.PushDataReply.FromString(replies[0])
        return reply.batch_id, reply.image_count, relay

    async def _deliver(self, batch_id: str, images: int, relay: ToShard | None) -> None:
        """Every result of the batch not delivered yet, then its completion (with its last result
        when that comes through here)."""
        if relay is None:
            reported = await self._deliver_here(batch_id)
        else:
            sent = 0

            async def forward(payload: bytes) -> None:
                nonlocal sent
                sent += 1  # a shard sends each image of a batch once, so the count says when it is the last
                await self._write_raw(self._head(batch_id, complete=sent == images) + _as_result(payload))

            async with self._relayed:
                request = infer_pb2.PullResultRequest(batch_ids=[batch_id]).SerializeToString()
                await relay.call(PULL, self._context, request, forward)
            reported = sent == images
        if not reported:
            await self._write_raw(self._head(batch_id, complete=True))

    async def _deliver_here(self, batch_id: str) -> bool:
        """``_deliver`` of a batch of this process, from its registry: whether its completion went
        with its last result."""
        reported = False
        with self._server.registry.subscribe([batch_id], self._identity.name) as cursor:
            while (outcome := await cursor.next()) is not None:
                last = cursor.is_last(outcome)
                async with self._writing:
                    reply = self._head(batch_id, complete=last) + image_results([outcome], _RESULTS_FIELD)
                    await write_outcomes(self._context, cursor, [outcome], reply)
                reported = last
        return reported

    def _head(self, batch_id: str, complete: bool) -> bytes:
        """A reply's answers (the batch's deferred ones: it has news) and completion."""
        answers = self._deferred.pop(batch_id, ())
        return infer_pb2.SessionReply(answers=answers, completed=[batch_id] if complete else ()).SerializeToString()

    async def _write(self, reply: infer_pb2.SessionReply) -> None:
        await self._write_raw(reply.SerializeToString())

    async def _write_raw(self, reply: bytes) -> None:
        async with self._writing:
            await self._context.write(reply)


def _collect(into: list[bytes]) -> Callable[[bytes], Awaitable[None]]:
    async def write(payload: bytes) -> None:
        into.append(payload)

    return write
