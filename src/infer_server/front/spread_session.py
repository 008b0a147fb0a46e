"""A gRPC Session of a server of several shards (``--shards``): each push on its shard.

Only the main process serves gRPC. A client on the local socket routes its session's pushes among
the shards itself (``infer_client.routed``); a gRPC client cannot, so the main process does it for
it: a push with a request id goes to the shard that owns the id (the shard the local socket's
clients push it to: one id is one batch on every transport), one without to each shard in turn
(``shard_relay.Relays.place``).

Each shard a session pushes to gets a sub-session of its own, opened when first needed: another
shard's is a Session relayed to it (``front.shard_relay``), this process's own a
``SessionProtocol`` on its registry. A push goes to its sub-session as it came; every reply of a
sub-session goes to the client as it is, since a sub-session answers with the client's tags and
each of its replies stands alone (answers, deferred ones included, before their batch's results;
completions). So the client sees the Session protocol of ``front.session``, each sub-session's
replies gathering what is ready as without shards. A relayed reply is acknowledged to its shard
only once written to the client, so a stream that breaks loses nothing: what it did not send stays
with its batch, for a pull or a push repeated with its request id.

The stream ends once the client half-closed and every sub-session ended (each once its batches were
delivered). A sub-session has no idle timeout of its own: this process ends the session after
``--stream-idle-timeout`` with nothing in flight, as ``SessionProtocol`` would, counting the
answers it waits for and the batches not reported complete from the replies it forwards (read
for their answers and completions only). A shard that exits ends the stream UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_proto import infer_pb2
from infer_server.front.errors import Unavailable, Unreadable, status_for
from infer_server.front.identity import Identity
from infer_server.front.session import SessionProtocol
from infer_server.front.shard_relay import SESSION, Sender, ToShard

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer

_ANSWERS, _COMPLETED = (infer_pb2.SessionReply.DESCRIPTOR.fields_by_name[n].number for n in ("answers", "completed"))
_EOF = None  # a sub-session's end of requests: the client half-closed


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def answers_and_completions(reply: bytes) -> tuple[list[infer_pb2.PushAnswer], list[str]]:
    """A serialized ``SessionReply``'s answers and completed batch ids, its results skipped unread
    (every field of a reply is length-delimited)."""
    answers, completed, pos = [], [], 0
    while pos < len(reply):
        key, pos = _varint(reply, pos)
        size, pos = _varint(reply, pos)
        if key >> 3 == _ANSWERS:
            answers.append(infer_pb2.PushAnswer.FromString(reply[pos : pos + size]))
        elif key >> 3 == _COMPLETED:
            completed.append(reply[pos : pos + size].decode())
        pos += size
    return answers, completed


class _Queued:
    """This process's sub-session's stream: the client's pushes handed over, its replies the client's."""

    def __init__(self, write: Any) -> None:
        self.requests: asyncio.Queue[Any] = asyncio.Queue(1)
        self.write = write

    async def read(self) -> Any:
        request = await self.requests.get()
        return grpc.aio.EOF if request is _EOF else request


class SpreadSession:
    """One gRPC Session of the main process of several shards: ``await SpreadSession(...).run()``."""

    def __init__(self, context: Any, server: InferenceServer, identity: Identity, idle_timeout_s: float | None) -> None:
        assert server.shards is not None
        self._context, self._server, self._identity = context, server, identity
        self._relays = server.shards.relays
        self._idle_timeout_s = idle_timeout_s
        self._writing = asyncio.Lock()  # one reply at a time, from every sub-session
        self._subs: dict[int, tuple[asyncio.Task[None], Any]] = {}  # by shard: its task, what takes its pushes
        self._unanswered = 0  # pushes handed to a sub-session, not answered yet
        self._held: collections.Counter[str] = collections.Counter()  # batches accepted, not reported complete
        self._changed = asyncio.Event()  # a push read, a reply written, a sub-session ended

    async def run(self) -> None:
        """Serve the stream until the client half-closed and every sub-session ended."""
        reader = asyncio.ensure_future(self._read())
        reader.add_done_callback(lambda _: self._changed.set())
        try:
            while True:
                self._changed.clear()
                for task, _ in self._subs.values():
                    if task.done():
                        task.result()  # one that failed (its shard exited) ends the stream with its error
                if reader.done():
                    reader.result()
                    if all(task.done() for task, _ in self._subs.values()):
                        return
                await self._wait()
        finally:
            tasks = [reader, *(task for task, _ in self._subs.values())]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def _idle(self) -> bool:
        return not self._unanswered and not self._held

    async def _wait(self) -> None:
        if not self._idle or self._idle_timeout_s is None:
            await self._changed.wait()
            return
        try:
            await asyncio.wait_for(self._changed.wait(), self._idle_timeout_s)
        except TimeoutError:
            if self._idle:
                raise Unavailable(f"session idle for {self._idle_timeout_s:g} s; open a new one") from None

    async def _read(self) -> None:
        while (request := await self._context.read()) is not grpc.aio.EOF:
            self._changed.set()
            if isinstance(request, Unreadable):  # this push alone fails; the session goes on
                await self._refuse(request.tag, grpc.StatusCode.INVALID_ARGUMENT, request.reason)
                continue
            try:
                relay = self._relays.place(request.push.request_id)
            except Exception as exc:  # its shard is being started again
                await self._refuse(request.tag, *status_for(exc, "Session push"))
                continue
            self._unanswered += 1
            await self._sub(relay).put(request if relay is None else request.SerializeToString())
        for _, requests in self._subs.values():
            await requests.put(_EOF)

    def _sub(self, relay: ToShard | None) -> asyncio.Queue[Any]:
        """The sub-session of ``relay``'s shard (None: this process's), opened if need be: what takes its pushes."""
        index = 0 if relay is None else relay.index
        if index not in self._subs:
            if relay is None:
                stream = _Queued(self._forward)
                task = asyncio.ensure_future(self._here(stream))
                self._subs[index] = (task, stream.requests)
            else:
                requests: asyncio.Queue[Any] = asyncio.Queue(1)
                task = asyncio.ensure_future(relay.call(SESSION, self._context, _feeding(requests), self._forward))
                self._subs[index] = (task, requests)
            task.add_done_callback(lambda _: self._changed.set())
        return self._subs[index][1]

    async def _here(self, stream: _Queued) -> None:
        server = self._server
        with server.registry.open_session() as cursor:
            push = functools.partial(server.push, peer=self._context.peer(), identity=self._identity)
            await SessionProtocol(stream, push, cursor, idle_timeout_s=None).run()

    async def _forward(self, reply: bytes) -> None:
        """A sub-session's reply, to the client as it is; what it answers and completes is counted."""
        answers, completed = answers_and_completions(reply)
        async with self._writing:
            await self._context.write(reply)
        self._unanswered -= len(answers)
        self._held.update(a.batch_id for a in answers if a.batch_id)
        self._held.subtract(completed)
        self._held += collections.Counter()  # drops the batches at zero
        self._changed.set()

    async def _refuse(self, tag: int, code: grpc.StatusCode, message: str) -> None:
        status = infer_pb2.Status(code=code.value[0], message=message)
        reply = infer_pb2.SessionReply(answers=[infer_pb2.PushAnswer(tag=tag, status=status)])
        async with self._writing:
            await self._context.write(reply.SerializeToString())


def _feeding(requests: asyncio.Queue[Any]) -> Any:
    """What sends a relayed sub-session's requests: the pushes handed to it, then its end."""

    async def feed(sender: Sender) -> None:
        while (request := await requests.get()) is not _EOF:
            await sender.send(request)
        await sender.close()

    return feed
