"""``InferenceService`` on grpc.aio: the three RPCs, thin, with errors leaving through ``rpc_boundary``.

* ``PushData``: one push, validated and admitted by ``InferenceServer.push``; answered with the
  batch id once the batch is queued.
* ``PullResult``: a ``PullCursor`` over the caller's given batches; one ``ImageResult`` per image,
  in completion order, until every image was delivered.
* ``Session``: pushes in, answers and results out on one stream (``front.session``).

In the main process of a server of several shards (``--shards``), a gRPC call is routed: each push
to its shard, each pulled batch read on its shard (``front.shard_relay``), a Session's pushes
through sub-sessions on their shards (``front.spread_session``); a local socket's call is not.

Every call is identified first (``front.identity``; a caller without valid credentials gets
UNAUTHENTICATED and an audit line), and streams count against the server's and the caller's
stream quotas (``StreamSlots``), so one caller cannot hold every stream and push others — health
checks included — out of ``--max-concurrent-rpcs``.

Requests are parsed by :func:`reader`, not by the generated stubs: a message over
``--max-message-bytes`` or one that does not parse becomes an ``Unreadable`` that the handler
answers INVALID_ARGUMENT — in a Session, for that push alone — instead of gRPC's own
RESOURCE_EXHAUSTED ("retry later", which it is not) or an INTERNAL that ends the whole stream.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError, Message

from infer_proto import infer_pb2
from infer_server.front import audit
from infer_server.front.errors import InvalidBatch, Overloaded, Unauthenticated, Unreadable, rpc_boundary
from infer_server.front.gate import CALLER
from infer_server.front.identity import Identity
from infer_server.front.session import SessionProtocol, outcome_to_proto, reply_bytes, write_outcomes
from infer_server.front.shard_relay import PULL, PUSH
from infer_server.front.spread_session import SpreadSession

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer
    from infer_server.front.shards import ShardProcesses

SERVICE_NAME = infer_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


def _collect(into: list[bytes]) -> Callable[[bytes], Awaitable[None]]:
    async def write(payload: bytes) -> None:
        into.append(payload)

    return write


def _leading_tag(raw: bytes) -> int:
    """Field 1 (``tag``, a varint) when it leads the message, as every protobuf encoder puts it."""
    if not raw or raw[0] != 0x08:
        return 0
    value, shift = 0, 0
    for byte in raw[1:11]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return 0


def reader(message: type[Message], limit: int) -> Callable[[bytes], Message | Unreadable]:
    """The request deserializer of one method: a message of at most ``limit`` bytes, or ``Unreadable``."""

    def parse(raw: bytes) -> Message | Unreadable:
        if len(raw) > limit:
            return Unreadable(f"message of {len(raw)} bytes is over the {limit}-byte limit", _leading_tag(raw))
        try:
            return message.FromString(raw)
        except DecodeError:
            return Unreadable(f"not a valid {message.DESCRIPTOR.name}", _leading_tag(raw))

    return parse


def readable(request: Any) -> Any:
    if isinstance(request, Unreadable):
        raise InvalidBatch(request.reason)
    return request


class StreamSlots:
    """Open streams, server-wide and per caller; ``open`` refuses one over either bound."""

    def __init__(self, total: int, per_identity: int) -> None:
        self.total, self.per_identity = total, per_identity
        self.open_streams = 0
        self._by_identity: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def open(self, identity: str) -> Iterator[None]:
        if self._by_identity[identity] >= self.per_identity:
            raise Overloaded(f"this caller has {self.per_identity} streams open, its quota; close one or retry later")
        if self.open_streams >= self.total:
            raise Overloaded("the server has as many streams open as it allows; retry later")
        self._by_identity[identity] += 1
        self.open_streams += 1
        try:
            yield
        finally:
            self.open_streams -= 1
            self._by_identity[identity] -= 1
            if not self._by_identity[identity]:
                del self._by_identity[identity]


class InferenceServicer:
    """PushData / PullResult / Session of one ``InferenceServer``."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server
        s = server.settings
        assert s.max_streams is not None
        # Without credentials every caller is the one anonymous identity: a per-caller share would
        # only lower the server's own bound.
        per_identity = s.max_streams_per_identity if server.authenticator.identifies else s.max_streams
        self.streams = StreamSlots(s.max_streams, per_identity)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, with ``reader`` deserializers."""
        limit = self._server.settings.max_message_bytes
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "PushData": grpc.unary_unary_rpc_method_handler(
                    self.PushData, reader(infer_pb2.PushDataRequest, limit), infer_pb2.PushDataReply.SerializeToString
                ),
                "PullResult": grpc.unary_stream_rpc_method_handler(
                    self.PullResult, reader(infer_pb2.PullResultRequest, limit), infer_pb2.ImageResult.SerializeToString
                ),
                "Session": grpc.stream_stream_rpc_method_handler(
                    self.Session, reader(infer_pb2.SessionRequest, limit), reply_bytes
                ),
            },
        )

    def identify(self, context: grpc.aio.ServicerContext, rpc: str) -> Identity:
        known = CALLER.get()  # identified by the gate, before the request was read
        if known is not None:
            return known
        try:
            return self._server.authenticator.identify(context)
        except Unauthenticated as exc:
            audit.refused_call(context.peer(), rpc, exc.code, exc.message)
            raise

    def _routing(self, context: Any) -> ShardProcesses | None:
        """The shards a gRPC call of the main process of several is routed among; None for a call on
        a local socket (its client routes, and a shard refuses what is another's: docs/security.md)."""
        return None if context.peer().startswith("local:") else self._server.shards

    @rpc_boundary
    async def PushData(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.PushDataReply:
        identity = self.identify(context, "PushData")
        request = readable(request)
        shards = self._routing(context)  # of a server of several: each gRPC push on its shard (Relays.place)
        if shards is not None and (shard := shards.relays.place(request.request_id)) is not None:
            replies: list[bytes] = []
            await shard.call(PUSH, context, request.SerializeToString(), _collect(replies))
            return infer_pb2.PushDataReply.FromString(replies[0])
        batch = await self._server.push(request, context.peer(), identity)
        return infer_pb2.PushDataReply(batch_id=batch.batch_id, image_count=batch.size)

    @rpc_boundary
    async def PullResult(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        identity = self.identify(context, "PullResult")
        request = readable(request)
        shards = self._routing(context)
        here, away = shards.relays.split(request.batch_ids) if shards is not None else (request.batch_ids, {})
        # A call the main process relayed here counted its stream there (shard_relay.CallFromMain).
        with contextlib.nullcontext() if getattr(context, "from_main", False) else self.streams.open(identity.name):
            if not away:
                await self._pull(here, identity, context)
                return
            writing = asyncio.Lock()  # one write at a time, from every part

            async def write(payload: bytes) -> None:
                async with writing:
                    await context.write(infer_pb2.ImageResult.FromString(payload))

            parts = [shard.call(PULL, context, infer_pb2.PullResultRequest(batch_ids=ids).SerializeToString(), write)
                     for shard, ids in away.items()]  # fmt: skip
            # Every part runs to its end, so that what each has sent is delivered before an error ends the call.
            ended = await asyncio.gather(*parts, *([self._pull(here, identity, context, writing)] if here else []),
                                         return_exceptions=True)  # fmt: skip
            if errors := [error for error in ended if isinstance(error, BaseException)]:
                raise errors[0]

    async def _pull(
        self, batch_ids: Any, identity: Identity, context: grpc.aio.ServicerContext, writing: Any = None
    ) -> None:
        """This process's batches of a pull, each result written (under ``writing``, a lock, when
        other shards' results share the stream) and then acknowledged."""
        with self._server.registry.subscribe(batch_ids, identity.name) as cursor:
            while (outcome := await cursor.next()) is not None:
                async with writing or contextlib.nullcontext():
                    await write_outcomes(context, cursor, [outcome], outcome_to_proto(outcome))

    @rpc_boundary
    async def Session(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        identity = self.identify(context, "Session")
        from_main = getattr(context, "from_main", False)  # a sub-session of the main process's (spread_session)
        idle = None if from_main else self._server.settings.stream_idle_timeout_s
        local = context.peer().startswith("local:")
        if self._routing(context) is not None:  # a gRPC client: the server routes its pushes
            with self.streams.open(identity.name):
                await SpreadSession(context, self._server, identity, idle).run()
            return
        with (
            contextlib.nullcontext() if from_main else self.streams.open(identity.name),
            self._server.registry.open_session() as cursor,
        ):
            push = functools.partial(self._server.push, peer=context.peer(), identity=identity)
            if local:  # the client routes among shards: it learns them first
                await context.write(self._server.shards_reply())
            await SessionProtocol(context, push, cursor, idle_timeout_s=idle).run()
