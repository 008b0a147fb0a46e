"""The local socket (``--local-socket``): the server's calls without gRPC, for clients on its host.

A client on the same host connects to a Unix-domain stream socket and speaks the framing of the
front processes' link (``relay.link``) itself: ``START`` (method and metadata), request messages
when asked (``WANT``), ``HALF_CLOSE``; the server answers messages and an ``END`` with the status.
Each call runs here as a relayed call does (``front.relayed``): the same gate, the same handlers,
``RelayedCall`` as its servicer context, so every contract of the gRPC path holds on this one.
What it saves is gRPC's per-message work, in the server and in the client: more than half of
each one's CPU per image on the single-image path (docs/local-socket.md).

The other end is not trusted as a front process is:
  * the peer is the kernel's word (``SO_PEERCRED``: pid and uid), never what the client says, and a
    client has no TLS auth context (with client certificates it needs a token, as on the Unix
    socket);
  * every frame is checked by its header before its payload is read (``LocalCalls.admit``): one
    longer than twice ``--max-message-bytes`` (a start: 64 KiB), a frame kind a client may not send,
    a call id not above the last one, a message past its call's window (``LocalCall``), anything
    but a cancel after a half-close, or a start that does not parse, drops the connection (its
    calls are cancelled, as when a client goes away);
  * a response write returns once the socket took it (or its buffer drained below asyncio's high
    water mark); a client that does not read is not read either past 8 MiB, and is dropped once
    it read nothing for as long as gRPC's keepalive or the idle stream timeout would allow
    (``LocalLink``);
  * connections are bounded and closed when idle (``LocalFront``).
The socket is created 0600: only the server's user (and root) may connect, as on ``--unix-socket``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import grpc.aio

from infer_proto.framing import HEADER, Kind, decode_call_start, encode_end
from infer_server.front.listen import OwnedSocket, replace_leftover_socket
from infer_server.front.relayed import CallBudget, CallDetails, Handlers, LinkedCalls, RelayedCall
from infer_server.relay.link import Link

log = logging.getLogger(__name__)

WINDOW = 1024 * 1024  # request bytes a call may have on their way (``LocalCall``; docs/local-socket.md)
_MAX_START_BYTES = 64 * 1024  # method and metadata (gRPC's default metadata limit is 8 KiB)
_OUTPUT_CAP = 8 * 1024 * 1024  # unsent bytes past which a connection is not read until its client reads
_ENDED_KEPT = 16  # ended calls a connection remembers, for messages already on their way to them
_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid
_STOPPING = encode_end(grpc.StatusCode.UNAVAILABLE.value[0], "the server is stopping")


class LocalCall(RelayedCall):
    """A local client's call: its request messages flow against a window of ``WINDOW`` bytes (the
    client may send while the bytes it sent, headers included, are fewer than those granted; the
    last message may overdraw), granted again as the handler takes them. A client pushing small
    messages then gets a ``WANT`` every few thousand of them (inline single images: every seven or
    so) instead of one per message, saving the server a ``send`` and the client a wake-up per
    request. Held here per call: at most the window and one message, as gRPC holds a stream's
    flow-control window."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.granted = self.received = self.consumed = 0
        self.half_closed = False

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
        self.consumed += HEADER.size + len(raw)

    def deliver(self, raw: bytes | None) -> None:
        if raw is not None:
            self.received += HEADER.size + len(raw)
        self._inbox.put(raw)


class _EndedCall:
    """What a connection remembers of an ended call, for request messages already on their way to
    it (counted against its window, then dropped): not its unread messages."""

    def __init__(self, call: LocalCall) -> None:
        self.granted, self.received, self.half_closed = call.granted, call.received, call.half_closed

    @property
    def wanted(self) -> bool:
        return self.received < self.granted


class LocalLink(Link):
    """A client's connection: ``Link`` framing, every frame checked by its header before its
    payload is read (``LocalCalls.admit``), each response acknowledged to its call as soon as the
    socket took it (a front process acknowledges after writing to its client). A client that does
    not read: past ``_OUTPUT_CAP`` unsent bytes its connection is not read either, and once it has
    not read for ``stall_s`` the connection is dropped and its calls cancelled (their results go
    back). With no pings to tell a frozen client from a busy one, ``stall_s`` is the longer of
    gRPC's keepalive drop and the idle stream timeout."""

    def __init__(self, calls: LocalCalls, max_payload: int, stall_s: float) -> None:
        super().__init__(calls.on_frame, calls.lost, max_payload)
        self._calls, self._stall_s = calls, stall_s
        self._sent: list[int] = []  # calls whose responses were queued this turn
        self._unacked: list[int] = []  # written while the socket's buffer is over its high water mark
        self._paused = self._not_reading = False
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        pid, uid, _ = _CREDENTIALS.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size))
        self._calls.peer = f"local:pid={pid},uid={uid}"
        if self._calls.refused:
            self.drop(f"{self._calls.peer}: as many local connections as --max-concurrent-rpcs are open")

    def admit(self, call: int, kind: int, length: int) -> str | None:
        return super().admit(call, kind, length) or self._calls.admit(call, kind, length)

    def send(self, call: int, kind: Kind, payload: bytes = b"", now: bool = False) -> None:
        """A response message goes out at once, with what was queued before it: the socket takes
        it now (or it waits over the high water mark), so the handler's ``write`` is acknowledged
        before it awaits and goes on in the same turn of the loop, not two turns later."""
        message = kind == Kind.MESSAGE and not self.closed and not self.dropped
        if message:
            self._sent.append(call)
        super().send(call, kind, payload, now=now or message)

    def _flush(self) -> None:
        super()._flush()
        if self.closed or self.dropped or self._transport is None or self._transport.is_closing():
            # Never written: the calls are being cancelled. A transport closing (the client's end
            # failed or ended) drops writes before ``connection_lost`` comes, a callback later.
            self._sent.clear()
            return
        self._unacked += self._sent
        self._sent = []
        if not self._paused:
            self._ack()
        elif not self._not_reading and self._transport.get_write_buffer_size() > _OUTPUT_CAP:
            self._not_reading = True
            self._transport.pause_reading()

    def pause_writing(self) -> None:
        self._paused = True
        self._stall = asyncio.get_running_loop().call_later(self._stall_s, self._stalled)

    def resume_writing(self) -> None:
        self._paused = False
        if self._stall is not None:
            self._stall.cancel()
        if self._not_reading and self._transport is not None:
            self._not_reading = False
            self._transport.resume_reading()  # type: ignore[attr-defined]
        self._ack()

    def _stalled(self) -> None:
        self.drop(f"{self._calls.peer} read nothing for {self._stall_s:g} s")

    def close(self) -> None:
        """Close once what is queued is written; a client that never reads it is dropped after
        ``stall_s``, so a closed connection never lingers."""
        super().close()
        if not self.closed and (self._stall is None or self._stall.cancelled()):
            self._stall = asyncio.get_running_loop().call_later(self._stall_s, self._stalled)

    def _ack(self) -> None:
        calls, self._unacked = self._unacked, []
        for call_id in calls:
            self._calls.written(call_id)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
        super().connection_lost(exc)


class LocalCalls(LinkedCalls):
    """The calls of one client's connection to the local socket."""

    link: LocalLink
    call_class = LocalCall

    def __init__(self, front: LocalFront) -> None:
        super().__init__(front.handlers, front.gate, front.budget)
        self.link = LocalLink(self, front.max_payload, front.stall_s)
        self.peer = "local:unknown"
        self._front = front
        self._last_id = 0  # call ids only grow: an id is never reused on a connection
        self._ended_calls: collections.OrderedDict[int, _EndedCall] = collections.OrderedDict()
        self.active = time.monotonic()  # the last call's start or end
        self.refused = False  # one connection too many: closed as it opens

    def _call(self, call_id: int) -> LocalCall | _EndedCall | None:
        call: LocalCall | None = self._calls.get(call_id)  # type: ignore[assignment]  # call_class
        return call or self._ended_calls.get(call_id)

    def admit(self, call_id: int, kind: int, length: int) -> str | None:
        """Why a frame may not come (see ``LocalLink``), from its header alone; None if it may."""
        if kind == Kind.START:
            if call_id <= self._last_id or length > _MAX_START_BYTES:
                return f"{self.peer} started call {call_id} after {self._last_id} ({length} bytes)"
            return None
        call = self._call(call_id) if 0 < call_id <= self._last_id else None
        if kind == Kind.MESSAGE:
            if call is None or call.half_closed or not call.wanted:
                return f"{self.peer} sent a message to call {call_id} unasked"
            return None
        if kind in (Kind.HALF_CLOSE, Kind.CANCEL) and length == 0 and 0 < call_id <= self._last_id:
            if kind == Kind.HALF_CLOSE and call is not None and call.half_closed:
                return f"{self.peer} half-closed call {call_id} twice"
            return None
        return f"{self.peer} sent a frame of kind {kind} for call {call_id}"

    def on_frame(self, call_id: int, kind: int, payload: bytes) -> None:
        """A frame ``admit`` let in."""
        if kind == Kind.START:
            self._start(call_id, payload)
            return
        call = self._call(call_id)
        if call is None:
            return  # a call refused (it was never asked for anything), or one long ended
        if isinstance(call, _EndedCall):  # ended meanwhile: what was on its way is counted, not kept
            call.received += HEADER.size + len(payload) if kind == Kind.MESSAGE else 0
            call.half_closed = call.half_closed or kind == Kind.HALF_CLOSE
        elif kind == Kind.MESSAGE:
            call.deliver(payload)
        elif kind == Kind.HALF_CLOSE:
            call.half_closed = True
            call.deliver(None)
        elif call.task is not None:
            call.task.cancel()

    def _start(self, call_id: int, payload: bytes) -> None:
        self._last_id, self.active = call_id, time.monotonic()
        try:
            method, metadata, _ = decode_call_start(payload)  # a peer it names is not believed
        except ValueError as exc:
            self.link.drop(f"{self.peer}: {exc}")
            return
        if self._front.stopping:  # as gRPC refuses a call while its server stops
            self.link.send(call_id, Kind.END, _STOPPING)
            return
        self.begin(call_id, CallDetails(method, metadata), self.peer, {})

    def _ended(self, call_id: int) -> None:
        self._ended_calls[call_id] = _EndedCall(cast(LocalCall, self._calls[call_id]))
        if len(self._ended_calls) > _ENDED_KEPT:
            self._ended_calls.popitem(last=False)
        super()._ended(call_id)
        self.active = time.monotonic()

    def written(self, call_id: int) -> None:
        call = self._calls.get(call_id)
        if call is not None:
            call.acked()

    @property
    def idle(self) -> bool:
        return not self._calls

    def lost(self) -> None:
        self.cancel_all()
        self._front.connections.discard(self)


class LocalFront:
    """The local socket's listener and its connections (``start``, ``stop(grace)``).

    Connections are bounded (``--max-concurrent-rpcs`` of them; one more is closed at once), and
    one without a call for ``--stream-idle-timeout-s`` is closed: a client holds a descriptor of
    the main process only while it uses it."""

    def __init__(self, path: Path, handlers: Handlers, gate: Sequence[grpc.aio.ServerInterceptor], limit: int,
                 max_message_bytes: int, *, idle_s: float = 300.0, stall_s: float = 80.0) -> None:  # fmt: skip
        self.path, self.handlers, self.gate = path, handlers, gate
        self.budget = CallBudget(limit)  # counted apart from gRPC's calls, against the same limit
        self.max_payload = 2 * max_message_bytes  # gRPC takes in up to twice that too (front.listen)
        self.idle_s, self.stall_s = idle_s, stall_s
        self.connections: set[LocalCalls] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._owned = OwnedSocket(path)
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen on the socket, created 0600 (a leftover socket of an earlier run is replaced)."""
        replace_leftover_socket(self.path, "--local-socket")
        old = os.umask(0o177)
        try:
            self._server = await asyncio.get_running_loop().create_unix_server(self._accept, path=str(self.path))
        finally:
            os.umask(old)
        self._owned.claim()
        self._sweeper = asyncio.ensure_future(self._sweep())

    def _accept(self) -> LocalLink:
        calls = LocalCalls(self)
        calls.refused = len(self.connections) >= self.budget.limit
        if not calls.refused:
            self.connections.add(calls)
        return calls.link

    async def _sweep(self) -> None:
        """Close connections without a call for ``idle_s``."""
        while True:
            await asyncio.sleep(self.idle_s / 4)
            now = time.monotonic()
            for calls in list(self.connections):
                if calls.idle and now - calls.active >= self.idle_s:
                    calls.link.close()

    async def stop(self, grace: float) -> None:
        """No new connection or call; open calls may end within ``grace``, then they are cancelled."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = [task for calls in self.connections for task in calls.tasks()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for calls in list(self.connections):
            calls.cancel_all()
            calls.link.close()
        await asyncio.gather(*tasks, return_exceptions=True)  # their results went back to the registry
        self._owned.remove()
