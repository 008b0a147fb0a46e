"""One gRPC front process: serves the server's port and relays every call to the main process.

Started by ``front.fronts.FrontProcesses`` as ``python -m infer_server.relay <fd> <index>``, with
one end of a socket pair as ``fd``. It waits for the server's settings on that link, binds the
server's TCP port (with ``SO_REUSEPORT``, which gRPC sets: the kernel spreads new connections over
every front process of the server; only the first also binds the Unix socket), tells the main
process the port, and serves until told to stop or until the main process is gone.

It knows nothing of the services: one generic handler takes every method, as raw message bytes,
and forwards it (``relay.link`` has the frames). So gRPC's own per-message work — HTTP/2, the
I/O thread, reading and writing each message — runs here, on as many cores as there are front
processes, and the main process handles only the decoded calls. Keepalive, message size limits and
TLS apply here, as a server in the main process would apply them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import signal
import socket
import sys
from typing import Any, cast

import grpc
import grpc.aio

from infer_proto.framing import LINK, Kind, decode_end, encode_end
from infer_server import event_loop
from infer_server.event_loop import EventLoop
from infer_server.front.listen import channel_options, listen
from infer_server.relay.link import Link, encode_start
from infer_server.settings import ServerSettings

log = logging.getLogger("infer_server.relay")

_CODES = {code.value[0]: code for code in grpc.StatusCode}
_GONE = encode_end(grpc.StatusCode.UNAVAILABLE.value[0], "the server's main process is gone; retry")


class _Call:
    """A forwarded call's state here: the requests the main process asked for, and what it sent."""

    __slots__ = ("credit", "events")

    def __init__(self) -> None:
        self.credit = asyncio.Semaphore(0)  # one per WANT: read one more request message
        self.events: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()  # MESSAGE and END, in order


class Relay(grpc.GenericRpcHandler):
    """Every method of every service, forwarded over the link."""

    def __init__(self) -> None:
        self.link = Link(self._on_frame, self._on_lost)
        self.calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        loop = asyncio.get_running_loop()
        self.config: asyncio.Future[bytes] = loop.create_future()
        self.stopping: asyncio.Future[float] = loop.create_future()

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        # Raw bytes both ways (no (de)serializers); stream-stream carries every kind of call.
        return grpc.stream_stream_rpc_method_handler(functools.partial(self._forward, handler_call_details.method))

    def _on_frame(self, call_id: int, kind: int, payload: bytes) -> None:
        if call_id == LINK:
            if kind == Kind.CONFIG and not self.config.done():
                self.config.set_result(payload)
            elif kind == Kind.STOP and not self.stopping.done():
                self.stopping.set_result(float(payload))
            return
        call = self.calls.get(call_id)
        if call is None:  # ended here already (the client went away)
            return
        if kind == Kind.WANT:
            call.credit.release()
        else:
            call.events.put_nowait((kind, payload))

    def _on_lost(self) -> None:
        for call in self.calls.values():
            call.events.put_nowait((Kind.END, _GONE))
        if not self.config.done():
            self.config.set_exception(ConnectionError("the main process closed the link before configuring"))
        if not self.stopping.done():
            self.stopping.set_result(0.0)

    async def _forward(self, method: str, _requests: Any, context: grpc.aio.ServicerContext) -> None:
        call_id = next(self._ids)
        call = self.calls[call_id] = _Call()
        start = encode_start(method, context.invocation_metadata() or (), context.peer(), context.auth_context() or {})
        self.link.send(call_id, Kind.START, start)
        reader = asyncio.ensure_future(self._read(call_id, call, context))
        reader.add_done_callback(lambda task: task.cancelled() or task.exception())  # a failed read ends the call
        ended = False
        try:
            while True:
                kind, payload = await call.events.get()
                if kind == Kind.MESSAGE:
                    await context.write(payload)
                    self.link.send(call_id, Kind.ACK)
                elif kind == Kind.END:
                    ended = True
                    code, details = decode_end(payload)
                    if code:
                        await context.abort(_CODES.get(code, grpc.StatusCode.UNKNOWN), details)
                    return
        finally:
            reader.cancel()
            del self.calls[call_id]
            if not ended:
                self.link.send(call_id, Kind.CANCEL)

    async def _read(self, call_id: int, call: _Call, context: grpc.aio.ServicerContext) -> None:
        """Read the client's messages, one per WANT; the end of its stream is a HALF_CLOSE."""
        while True:
            await call.credit.acquire()
            message = await context.read()
            if message is grpc.aio.EOF:
                self.link.send(call_id, Kind.HALF_CLOSE)
                return
            self.link.send(call_id, Kind.MESSAGE, message)


async def serve(fd: int, index: int) -> None:
    """Configure from the link, serve until told to stop (or the main process is gone)."""
    loop = asyncio.get_running_loop()
    relay = Relay()
    await loop.connect_accepted_socket(lambda: relay.link, socket.socket(fileno=fd))
    settings = ServerSettings.model_validate_json(await relay.config)
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[front {index}]: %(message)s")  # fmt: skip
    server = grpc.aio.server(options=channel_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs)
    server.add_generic_rpc_handlers((relay,))
    try:
        port = listen(server, settings)
    except RuntimeError as exc:
        log.error("cannot start: %s", exc)
        relay.link.close()
        return
    await server.start()
    relay.link.send(LINK, Kind.READY, str(port).encode())
    grace = await relay.stopping
    await server.stop(grace)
    relay.link.close()


def main(argv: list[str]) -> None:
    # Ctrl-C, and a stop signal sent to the whole process group (systemd's default), reach this process
    # too: the main process drains, then tells this one to stop; it also ends when the link closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(ConnectionError):
        event_loop.run(serve(int(argv[0]), int(argv[1])), cast(EventLoop, argv[2]))
