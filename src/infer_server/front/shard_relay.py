"""gRPC calls the main process hands to another shard (``--shards``), and the shard's end of them.

Only the main process (shard 0) serves gRPC. So that a gRPC client reaches every shard's workers
and batches, the main process relays calls to shard k over a socket pair the shard inherits, in
``relay.link``'s frames, as a front process relays calls to the main process: a push goes to its
shard (``Relays.place``: with a request id, the shard that owns the id, as on the local socket, so
one id is one batch on every transport; without one, each shard in turn), whether it comes as a
``PushData`` or in a ``Session`` (``front.spread_session``), and ``PullResult`` reads each batch on
its shard (``front.service``).

The shard runs a relayed call through its own gate and handlers (``FromMain``: the calls of a
front process's link, ``front.relayed``). The main process writes each response to its client and
only then acknowledges it (``ToShard.call``), so a result counts as delivered in the shard's
registry only once the client's stream took it, as without shards; a client that goes away
cancels the shard's handler, and what it had not acknowledged goes back to the shard's registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import grpc.aio

from infer_proto.framing import Kind, decode_end, encode_end
from infer_proto.shards import batch_shard, request_shard
from infer_server.front.errors import ServerError, Unavailable
from infer_server.front.relayed import CallBudget, Handlers, RelayedCall, RelayedCalls
from infer_server.relay.link import Link, encode_start

Gates = Sequence[grpc.aio.ServerInterceptor]


class Relayed(ServerError):
    """A relayed call that a shard ended with an error: its status, as the shard gave it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


_CODES = {code.value[0]: code for code in grpc.StatusCode}
_SERVICE = "/infer.v1.InferenceService"
PUSH, PULL, SESSION = f"{_SERVICE}/PushData", f"{_SERVICE}/PullResult", f"{_SERVICE}/Session"  # relayed methods


class Sender:
    """A relayed call's requests: each ``send`` waits until the shard asks for one (its ``WANT``),
    so that a shard that reads no more holds the sender back, as gRPC's flow control would."""

    def __init__(self, link: Link, call_id: int) -> None:
        self._link, self._call_id = link, call_id
        self.credit = asyncio.Semaphore(0)

    async def send(self, message: bytes) -> None:
        await self.credit.acquire()
        self._link.send(self._call_id, Kind.MESSAGE, message)

    async def close(self) -> None:
        """No more requests (the client's half-close)."""
        await self.credit.acquire()
        self._link.send(self._call_id, Kind.HALF_CLOSE)

    async def one(self, message: bytes) -> None:
        await self.send(message)
        await self.close()  # asked only by a method that reads a stream of requests


class ToShard:
    """The main process's end of one shard's relay link: calls started here, answered there."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.link = Link(self._on_frame, self._lost)
        self._calls: dict[int, asyncio.Queue[tuple[int, bytes]]] = {}
        self._ids = itertools.count(1)

    async def connect(self, sock: socket.socket) -> None:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self.link, sock)

    async def call(self, method: str, context: Any, requests: bytes | Callable[[Sender], Awaitable[None]],
                   write: Callable[[bytes], Awaitable[None]]) -> None:  # fmt: skip
        """Run ``method`` on the shard with the call's metadata, peer and TLS auth context, and
        ``requests``: its one message, or what sends them (each once the shard asks, then the end of
        them: ``Sender``); ``write`` each response (serialized), acknowledged once it returns. A
        call the shard ends with an error raises ``Relayed``; one whose task is cancelled (the
        client went away) is cancelled on the shard."""
        if self.link.closed:
            raise Relayed(grpc.StatusCode.UNAVAILABLE, f"shard {self.index} is being started again; retry")
        call_id = next(self._ids)
        events = self._calls[call_id] = asyncio.Queue()
        start = encode_start(method, context.invocation_metadata() or (), context.peer(), context.auth_context() or {})
        self.link.send(call_id, Kind.START, start)
        sender = Sender(self.link, call_id)
        feeding = asyncio.ensure_future(sender.one(requests) if isinstance(requests, bytes) else requests(sender))
        ended = False
        try:
            while True:
                kind, payload = await events.get()
                if kind == Kind.WANT:
                    sender.credit.release()
                elif kind == Kind.MESSAGE:
                    await write(payload)
                    self.link.send(call_id, Kind.ACK)
                elif kind == Kind.END:
                    ended = True
                    code, details = decode_end(payload)
                    if code:
                        raise Relayed(_CODES.get(code, grpc.StatusCode.UNKNOWN), details)
                    return
                if feeding.done() and not feeding.cancelled() and (failed := feeding.exception()) is not None:
                    raise failed  # what sends the requests failed: so does the call (it would wait for good)
        finally:
            feeding.cancel()
            del self._calls[call_id]
            if not ended:
                self.link.send(call_id, Kind.CANCEL)

    def _on_frame(self, call_id: int, kind: int, payload: bytes) -> None:
        events = self._calls.get(call_id)
        if events is not None:
            events.put_nowait((kind, payload))

    def _lost(self) -> None:
        gone = encode_end(grpc.StatusCode.UNAVAILABLE.value[0], f"shard {self.index} exited; retry")
        for events in self._calls.values():
            events.put_nowait((Kind.END, gone))

    def close(self) -> None:
        self.link.close()


class Relays(dict[int, ToShard]):
    """Each running shard's relay (this process's own and a shard being started again have none),
    and where the main process's gRPC calls go."""

    def __init__(self, shards: int) -> None:
        super().__init__()
        self.shards = shards
        self._turns = itertools.count()

    def place(self, request_id: str) -> ToShard | None:
        """Where a gRPC push goes (None: here): with a request id, to the shard that owns it (where
        the local socket's clients push it too: one id, one batch, whatever the transport), refused
        UNAVAILABLE while that shard is being started again; without one, to each shard in turn."""
        if not request_id:
            return self.get(next(self._turns) % self.shards)
        owner = request_shard(request_id, self.shards)
        if owner and owner not in self:
            raise Unavailable(f"shard {owner}, which holds this request id's batch, is being started again; retry")
        return self.get(owner)

    def split(self, batch_ids: Sequence[str]) -> tuple[list[str], dict[ToShard, list[str]]]:
        """The batch ids this process holds (or that name no running shard: it answers them), and the
        others by the relay of the shard that holds them (an id names its shard, ``batch_shard``)."""
        here: list[str] = []
        away: dict[ToShard, list[str]] = {}
        for batch_id in batch_ids:
            relay = self.get(batch_shard(batch_id, self.shards) or 0)
            (here if relay is None else away.setdefault(relay, [])).append(batch_id)
        return here, away


class CallFromMain(RelayedCall):
    """A call the main process relayed: it counted the client's stream against the stream quotas
    already, and a Session's idle time is its to judge (``front.spread_session``)."""

    from_main = True


class FromMain:
    """A shard's gRPC front: the calls the main process relays to it, over the inherited ``sock``,
    served by this shard's gate and handlers (``start`` answers 0: the shard has no port). The
    main process relays at most one call here per call of its own (``max_concurrent_rpcs``)."""

    def __init__(self, sock: socket.socket, handlers: Handlers, gate: Gates, max_calls: int) -> None:
        self._sock = sock
        self._calls = RelayedCalls(handlers, gate, CallBudget(max_calls), lambda: None)
        self._calls.call_class = CallFromMain
        self._calls.ready.set_result(0)  # nothing to wait for: the main process is there already

    async def start(self) -> int:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: self._calls.link, self._sock)
        return 0

    async def stop(self, grace: float) -> None:
        """Calls still open may end within ``grace``; then they are cancelled."""
        tasks = self._calls.tasks()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        self._calls.cancel_all()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        self._calls.link.close()
