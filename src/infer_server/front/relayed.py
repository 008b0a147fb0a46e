"""Calls relayed by the gRPC front processes (``--fronts N``), run here against the server's handlers.

A front process (``relay.process``) forwards each call's start, request messages and end over its
link; ``RelayedCalls`` (one per link; ``LinkedCalls``, which a local socket's connection shares,
``front.local``) runs each call in its own task, through the same gate and
the same method handlers a grpc.aio server in this process would (``Handlers``), with a
``RelayedCall`` as the servicer context. Servicers cannot tell the two apart: identity, metadata,
peer, abort, read and write mean what they mean under grpc.aio. A call the front process reports
gone (``CANCEL``), or every call of a front process that died, is cancelled, as grpc.aio cancels
the handler of a call whose client went away; a stream's results not yet acknowledged go back to
the registry (``session.write_outcomes``) and are sent again.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from infer_proto.framing import LINK, Kind, encode_end
from infer_server.relay.link import Link, decode_start

log = logging.getLogger(__name__)

Interceptor = Callable[
    [Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]], grpc.HandlerCallDetails],
    Awaitable[grpc.RpcMethodHandler | None],
]


class Handlers:
    """The server's RPC handlers, collected as a gRPC server collects them (generic handlers, and
    per-service method tables), so a grpc.aio server (``add_to``) and relayed calls (``find``)
    serve the very same ones. The ``add_*`` methods are what generated ``add_*_to_server`` call."""

    def __init__(self) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._tables: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self._methods: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self._tables[service] = dict(handlers)
        self._methods.update({f"/{service}/{method}": handler for method, handler in handlers.items()})

    def add_to(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers(tuple(self._generic))
        for service, table in self._tables.items():
            server.add_registered_method_handlers(service, table)

    async def find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The handler of a call (a coroutine: it is an interceptor's continuation)."""
        found = self._methods.get(details.method)
        for generic in self._generic:
            if found is not None:
                break
            found = generic.service(details)
        return found


_YIELD_EVERY = 16  # writes acknowledged at once (local socket) in a row before one yields to the loop


class Inbox:
    """A call's request messages delivered and not read yet: ``put`` them, one reader ``get``s them
    in order. ``asyncio.Queue`` without what a relayed call never uses (a bound, several readers,
    ``join``): two Python calls a message instead of about ten, and no ``getpid`` system call per
    wait (a ``Queue`` asks for the running loop each time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[bytes | None] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: bytes | None) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> bytes | None:
        while not self._items:  # cancelled while waiting: nothing is taken, the items stay
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class CallDetails(grpc.HandlerCallDetails):
    """What the gate and the generic handlers read of a call before it is served."""

    def __init__(self, method: str, invocation_metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class RelayedCall:
    """One relayed call's servicer context: the part of ``grpc.aio.ServicerContext`` the server's
    servicers, gRPC's health servicer and its reflection servicer use."""

    def __init__(self, call_id: int, link: Link, details: CallDetails, peer: str, auth: dict[str, list[bytes]]) -> None:
        self.call_id, self.details = call_id, details
        self._link, self._peer, self._auth = link, peer, auth
        self.code, self.message = grpc.StatusCode.OK, ""
        self.serialize: Callable[[Any], bytes] | None = None
        self.deserialize: Callable[[bytes], Any] | None = None
        self.task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()  # made on the loop; asked once, not per write (a getpid each)
        self._inbox = Inbox(self._loop)  # requests asked for; None: the client's end
        self._asked = self._ended = False
        self._writes: collections.deque[asyncio.Future[None] | None] = collections.deque()  # awaiting ACK
        self._unyielded = 0  # writes acknowledged as they were sent, since the last forced yield

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.details.invocation_metadata

    def peer(self) -> str:
        return self._peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def time_remaining(self) -> float | None:
        return None  # the front process enforces the deadline: it cancels the call

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.message = details

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        self.code, self.message = code, details
        raise grpc.aio.AbortError()

    async def read(self, ahead: bool = True) -> Any:
        """The client's next message (``grpc.aio.EOF`` after its last); with ``ahead``, the one
        after it is asked for at once, so it arrives while this one is handled."""
        if self._ended:
            return grpc.aio.EOF
        self._ask()
        raw = await self._inbox.get()
        if raw is None:
            self._ended = True
            return grpc.aio.EOF
        self._took(raw)
        if ahead:
            self._ask()
        if self.deserialize is None:
            return raw
        try:
            return self.deserialize(raw)
        except Exception:
            await self.abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!")


    def _ask(self) -> None:
        if not self._asked and not self._ended:
            self._asked = True
            self._link.send(self.call_id, Kind.WANT)

    def _took(self, raw: bytes) -> None:
        """A request message left the inbox for the handler."""

    def deliver(self, raw: bytes | None) -> None:
        """A request message (None: the client's last was sent), as asked for."""
        self._asked = False
        self._inbox.put(raw)

    async def write(self, message: Any) -> None:
        """Returns once the front process wrote the message to the client's stream. The local
        socket may say so as it sends: such a write does not yield to the loop, so every
        ``_YIELD_EVERY``-th one still does, and a stream with a backlog cannot hold the loop."""
        written = self._loop.create_future()
        self._send(message, written)
        if written.done():
            self._unyielded += 1
            if self._unyielded >= _YIELD_EVERY:
                self._unyielded = 0
                await asyncio.sleep(0)
        await written

    def _send(self, message: Any, written: asyncio.Future[None] | None) -> None:
        payload = self.serialize(message) if self.serialize else message
        self._writes.append(written)  # first: the link may acknowledge the write as it sends (local)
        try:
            self._link.send(self.call_id, Kind.MESSAGE, payload)
        except BaseException:
            self._writes.pop()
            raise

    def acked(self) -> None:
        written = self._writes.popleft() if self._writes else None
        if written is not None and not written.done():
            written.set_result(None)

    async def requests(self) -> AsyncIterator[Any]:
        while (message := await self.read()) is not grpc.aio.EOF:
            yield message

    async def serve(self, handler: grpc.RpcMethodHandler) -> None:
        """Run ``handler`` for this call, as grpc.aio runs a method handler of each kind."""
        self.serialize, self.deserialize = handler.response_serializer, handler.request_deserializer
        if handler.request_streaming:
            request: Any = self.requests()
        elif (request := await self.read(ahead=False)) is grpc.aio.EOF:
            await self.abort(grpc.StatusCode.INTERNAL, "the client sent no request message")
        behavior = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
        result = behavior(request, self)
        if not handler.response_streaming:
            response = await result
            if response is not None and self.code == grpc.StatusCode.OK:
                self._send(response, None)  # the END follows: nothing waits for this write
        elif inspect.isasyncgen(result):
            async for response in result:
                await self.write(response)
        else:
            await result  # the handler writes through this context


class CallBudget:
    """Concurrent relayed calls, over every front process: ``--max-concurrent-rpcs`` is the
    server's bound, as it is with gRPC in the main process (a front process alone could hold
    them all: one client's connection reaches one front process). The local socket's calls have
    a budget of their own, of the same size (``front.local``)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open = limit, 0


_OVER_BUDGET = encode_end(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "Concurrent RPC limit exceeded!")


class LinkedCalls:
    """The calls arriving over one link, each run in its own task through the gate and the handlers
    (``RelayedCalls``: a front process's link; ``front.local.LocalCalls``: a client's connection
    to the local socket). ``link`` is set by the subclass."""

    link: Link
    call_class: type[RelayedCall] = RelayedCall

    def __init__(self, handlers: Handlers, gate: Sequence[grpc.aio.ServerInterceptor], budget: CallBudget) -> None:
        self._handlers, self._gate, self._budget = handlers, gate, budget
        self._calls: dict[int, RelayedCall] = {}

    def begin(self, call_id: int, details: CallDetails, peer: str, auth: dict[str, list[bytes]]) -> None:
        """Run a call that started, or refuse it unread when the budget is spent."""
        if self._budget.open >= self._budget.limit:
            self.link.send(call_id, Kind.END, _OVER_BUDGET)  # as gRPC answers, before reading anything
            return
        call = self._calls[call_id] = self.call_class(call_id, self.link, details, peer, auth)
        self._budget.open += 1
        call.task = asyncio.ensure_future(self._run(call))
        call.task.add_done_callback(lambda _: self._ended(call_id))  # also when cancelled before it ran

    def _ended(self, call_id: int) -> None:
        del self._calls[call_id]
        self._budget.open -= 1

    def tasks(self) -> list[asyncio.Task[None]]:
        return [call.task for call in self._calls.values() if call.task is not None]

    def cancel_all(self) -> None:
        """The link is gone: so are its calls' clients."""
        for call in list(self._calls.values()):
            if call.task is not None:
                call.task.cancel()

    async def _find(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        """The call's handler, through the interceptors in order, as grpc.aio finds it."""
        continuation: Any = self._handlers.find
        for interceptor in reversed(self._gate):
            continuation = functools.partial(interceptor.intercept_service, continuation)
        return await continuation(details)  # type: ignore[no-any-return]

    async def _run(self, call: RelayedCall) -> None:
        try:
            handler = await self._find(call.details)
            if handler is None:
                call.code, call.message = grpc.StatusCode.UNIMPLEMENTED, "Method not found!"
            else:
                await call.serve(handler)
        except grpc.aio.AbortError:
            pass  # the status is the call's code and message
        except asyncio.CancelledError:
            return  # the client is gone: nobody to answer
        except Exception:
            log.exception("call %s failed", call.details.method)
            call.code, call.message = grpc.StatusCode.UNKNOWN, "Unexpected error (the server's log has it)"
        self.link.send(call.call_id, Kind.END, encode_end(call.code.value[0], call.message))


class RelayedCalls(LinkedCalls):
    """The calls of one front process's link."""

    def __init__(self, handlers: Handlers, gate: Sequence[grpc.aio.ServerInterceptor], budget: CallBudget,
                 on_lost: Callable[[], None]) -> None:  # fmt: skip
        super().__init__(handlers, gate, budget)
        self.link = Link(self._on_frame, self._lost)
        self.ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()  # the port it serves
        self._on_lost = on_lost

    def _on_frame(self, call_id: int, kind: int, payload: bytes) -> None:
        if call_id == LINK:
            if kind == Kind.READY and not self.ready.done():
                self.ready.set_result(int(payload))
            return
        if kind == Kind.START:
            method, metadata, peer, auth = decode_start(payload)
            self.begin(call_id, CallDetails(method, metadata), peer, auth)
            return
        call = self._calls.get(call_id)
        if call is None:
            return
        if kind == Kind.MESSAGE:
            call.deliver(payload)
        elif kind == Kind.HALF_CLOSE:
            call.deliver(None)
        elif kind == Kind.ACK:
            call.acked()
        elif kind == Kind.CANCEL and call.task is not None:
            call.task.cancel()

    def _lost(self) -> None:
        """The front process is gone: its calls' clients lost their connections with it."""
        self.cancel_all()
        if not self.ready.done():
            self.ready.set_exception(RuntimeError("the front process exited before it served (see its log above)"))
        self._on_lost()
