"""The local socket (``--local-socket``): the server's calls without gRPC, for clients on its host.

A client on the same host connects to a Unix-domain stream socket and speaks the framing of the
front processes' link (``relay.link``) itself: ``START`` (method and metadata), request messages
when asked (``WANT``), ``HALF_CLOSE``; the server answers messages and an ``END`` with the status.
Each call runs here as a relayed call does (``front.relayed``): the same gate, the same handlers,
``RelayedCall`` as its servicer context, so every contract of the gRPC path holds on this one.
What it saves is gRPC's per-message work, in the server and in the client: about half of each
per image on the single-image path (docs/local-socket.md).

The other end is not trusted as a front process is:
  * the peer is the kernel's word (``SO_PEERCRED``: pid and uid), never what the client says, and a
    client has no TLS auth context (with client certificates it needs a token, as on the Unix
    socket);
  * a frame longer than twice ``--max-message-bytes`` (and the start's own bound), a frame kind a
    client may not send, a call id not above the last one, a message the server did not ask for,
    anything after a half-close, or a start it cannot parse, drops the connection (its calls are
    cancelled, as when a client goes away): at most one unread request message per call is ever
    held here;
  * a response write returns once the socket took it (or its buffer drained below asyncio's high
    water mark): a client that stops reading holds its own calls' writers, nothing else.
The socket is created 0600: only the server's user (and root) may connect, as on ``--unix-socket``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio

from infer_proto.framing import Kind, decode_call_start, encode_end
from infer_server.front.listen import remove_socket, replace_leftover_socket
from infer_server.front.relayed import CallBudget, CallDetails, Handlers, LinkedCalls, RelayedCall
from infer_server.relay.link import Link

log = logging.getLogger(__name__)

WINDOW = 64 * 1024  # request bytes a call may have on their way (``LocalCall``)
_MAX_START_BYTES = 64 * 1024  # method and metadata (gRPC's default metadata limit is 8 KiB)
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_STOPPING = encode_end(grpc.StatusCode.UNAVAILABLE.value[0], "the server is stopping")


class LocalCall(RelayedCall):
    """A local client's call: its request messages flow against a window of ``WINDOW`` bytes (the
    client may send while the bytes it sent are fewer than those granted, the last message may
    overdraw), granted again as the handler takes them. A client pushing small messages then gets
    a ``WANT`` every few hundred of them instead of one per message, saving the server a ``send``
    and the client a wake-up per request. Held here per call: at most the window and one message."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.granted = self.received = self.consumed = 0

    @property
    def wanted(self) -> bool:
        """The client may send a request message now."""
        return self.received < self.granted

    def _ask(self) -> None:
        target = self.consumed + WINDOW
        if not self._ended and (not self.granted or target - self.granted >= WINDOW // 2):
            self._link.send(self.call_id, Kind.WANT, str(target - self.granted).encode())
            self.granted = target

    def _took(self, raw: bytes) -> None:
        self.consumed += len(raw)

    def deliver(self, raw: bytes | None) -> None:
        if raw is not None:
            self.received += len(raw)
        self._inbox.put_nowait(raw)


class LocalLink(Link):
    """A client's connection: ``Link`` framing, with each response acknowledged to its call as soon
    as the socket took it (a front process acknowledges after writing to its client)."""

    def __init__(self, calls: LocalCalls, max_payload: int) -> None:
        super().__init__(calls.on_frame, calls.lost, max_payload)
        self._calls = calls
        self._sent: list[int] = []  # calls whose responses were queued this turn
        self._unacked: list[int] = []  # written while the socket's buffer is over its high water mark
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        pid, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        self._calls.peer = f"local:pid={pid},uid={uid}"

    def send(self, call: int, kind: Kind, payload: bytes = b"") -> None:
        super().send(call, kind, payload)
        if kind == Kind.MESSAGE and not self.closed and not self.dropped:
            self._sent.append(call)

    def _flush(self) -> None:
        super()._flush()
        self._unacked += self._sent
        self._sent = []
        if not self._paused:
            self._ack()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._ack()

    def _ack(self) -> None:
        calls, self._unacked = self._unacked, []
        for call_id in calls:
            self._calls.written(call_id)


class LocalCalls(LinkedCalls):
    """The calls of one client's connection to the local socket."""

    link: LocalLink
    call_class = LocalCall

    def __init__(self, front: LocalFront) -> None:
        super().__init__(front.handlers, front.gate, front.budget)
        self.link = LocalLink(self, front.max_payload)
        self.peer = "local:unknown"
        self._front = front
        self._last_id = 0  # call ids only grow: an id is never reused on a connection
        self._half_closed: set[int] = set()

    def on_frame(self, call_id: int, kind: int, payload: bytes) -> None:
        if kind == Kind.START:
            self._start(call_id, payload)
            return
        call = self._calls.get(call_id)
        if kind not in (Kind.MESSAGE, Kind.HALF_CLOSE, Kind.CANCEL) or not 0 < call_id <= self._last_id:
            self.link.drop(f"{self.peer} sent a frame of kind {kind} for call {call_id}")
        elif call is None:
            return  # a call that ended meanwhile
        elif call_id in self._half_closed:
            self.link.drop(f"{self.peer} sent to call {call_id} after its half-close")
        elif kind == Kind.MESSAGE:
            if not cast(LocalCall, call).wanted:
                self.link.drop(f"{self.peer} sent a message to call {call_id} unasked")
                return
            call.deliver(payload)
        elif kind == Kind.HALF_CLOSE:
            self._half_closed.add(call_id)
            call.deliver(None)
        elif call.task is not None:
            call.task.cancel()

    def _start(self, call_id: int, payload: bytes) -> None:
        if call_id <= self._last_id or len(payload) > _MAX_START_BYTES:
            self.link.drop(f"{self.peer} started call {call_id} after {self._last_id} ({len(payload)} bytes)")
            return
        try:
            method, metadata = decode_call_start(payload)
        except ValueError as exc:
            self.link.drop(f"{self.peer}: {exc}")
            return
        self._last_id = call_id
        if self._front.stopping:  # as gRPC refuses a call while its server stops
            self.link.send(call_id, Kind.END, _STOPPING)
            return
        self.begin(call_id, CallDetails(method, metadata), self.peer, {})

    def _ended(self, call_id: int) -> None:
        super()._ended(call_id)
        self._half_closed.discard(call_id)

    def written(self, call_id: int) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            call.acked()

    def lost(self) -> None:
        self.cancel_all()
        self._front.connections.discard(self)


class LocalFront:
    """The local socket's listener and its connections (``start``, ``stop(grace)``)."""

    def __init__(self, path: Path, handlers: Handlers, gate: Sequence[grpc.aio.ServerInterceptor],
                 limit: int, max_message_bytes: int) -> None:  # fmt: skip
        self.path, self.handlers, self.gate = path, handlers, gate
        self.budget = CallBudget(limit)  # counted apart from gRPC's calls, against the same limit
        self.max_payload = 2 * max_message_bytes  # gRPC takes in up to twice that too (front.listen)
        self.connections: set[LocalCalls] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen on the socket, created 0600 (a leftover socket of an earlier run is replaced)."""
        replace_leftover_socket(self.path, "--local-socket")
        old = os.umask(0o177)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(self._accept, path=str(self.path))
        finally:
            os.umask(old)

    def _accept(self) -> LocalLink:
        calls = LocalCalls(self)
        self.connections.add(calls)
        return calls.link

    async def stop(self, grace: float) -> None:
        """No new connection or call; open calls may end within ``grace``, then they are cancelled."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        tasks = [task for calls in self.connections for task in calls.tasks()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for calls in list(self.connections):
            calls.cancel_all()
            calls.link.close()
        remove_socket(self.path)
