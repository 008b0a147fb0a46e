"""Where gRPC runs: in this process (``--fronts 0``, the default) or in front processes.

``InProcessFront`` is a grpc.aio server on this process's loop. ``FrontProcesses`` starts
``--fronts`` gRPC front processes (``relay.process``) that share the server's TCP port and relay
every call here (``front.relayed``), so gRPC's per-message work spreads over that many cores while
every decision stays in this process (docs/front-scaling.md). A front process that dies is started
again; its clients see their connection drop (UNAVAILABLE) and retry, and what they pushed is
answered exactly once as on any reconnect (request ids, results kept until pulled).

Both serve the same ``Handlers`` behind the same gate, and both have ``start() -> port`` and
``stop(grace)``; with ``--local-socket``, ``Fronts`` runs one of them and the local socket
(``front.local``) together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio

from infer_proto.framing import LINK, Kind
from infer_server.front.children import start_again, wait_or_kill
from infer_server.front.listen import OwnedSocket, channel_options, listen
from infer_server.front.local import LocalFront
from infer_server.front.relayed import CallBudget, Handlers, RelayedCalls
from infer_server.front.shard_relay import FromMain
from infer_server.settings import ServerSettings

log = logging.getLogger(__name__)

Gates = Sequence[grpc.aio.ServerInterceptor]

_READY_TIMEOUT_S = 60.0  # a front process binds and reports its port within this
_RESTART_DELAYS_S = (0.1, 0.5, 1.0, 2.0, 5.0)  # between restarts of one front process that keeps dying


class InProcessFront:
    """gRPC served by this process itself."""

    def __init__(self, settings: ServerSettings, handlers: Handlers, gate: Gates) -> None:
        self._settings = settings
        self._server = grpc.aio.server(
            interceptors=gate, options=channel_options(settings), maximum_concurrent_rpcs=settings.max_concurrent_rpcs
        )
        handlers.add_to(self._server)
        self._unix_socket = OwnedSocket(settings.unix_socket)

    async def start(self) -> int:
        port = listen(self._server, self._settings)
        self._unix_socket.claim()
        await self._server.start()
        return port

    async def stop(self, grace: float) -> None:
        await self._server.stop(grace)
        self._unix_socket.remove()


def _hold_port(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to the server's port that never listen (so no connection reaches them): while
    every front process is being started again, the port stays taken. Linux lets only a process of
    the same user join a port's ``SO_REUSEPORT`` group, so no other user can bind it meanwhile and
    receive the clients' next connections (and their tokens)."""
    held = []
    addresses: list[tuple[socket.AddressFamily, Any]]
    if host.strip("[]") in ("", "0.0.0.0", "::"):  # gRPC binds a wildcard host as [::] dual-stack and 0.0.0.0
        addresses = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    else:
        try:
            found = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except OSError:
            found = []
        addresses = [(family, address) for family, _, _, _, address in found]
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:  # no SO_REUSEADDR: with it, anyone may bind beside a socket that does not listen
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:  # both families, whatever net.ipv6.bindv6only says
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(address)
        except OSError as exc:
            log.warning("could not hold port %d on %s between front process restarts: %s", port, address[0], exc)
            sock.close()
            continue
        held.append(sock)
    return held


class FrontProcesses:
    """``--fronts`` gRPC front processes, each linked to this process by a socket pair."""

    def __init__(
        self, settings: ServerSettings, handlers: Handlers, gate: Gates, on_exit: Callable[[], None] = lambda: None
    ) -> None:
        self._settings, self._handlers, self._gate, self._on_exit = settings, handlers, gate, on_exit
        self._budget = CallBudget(settings.max_concurrent_rpcs)
        self._port = settings.port
        self._processes: dict[int, asyncio.subprocess.Process] = {}  # those that served: stopped, restarted
        self._links: dict[int, RelayedCalls] = {}
        self._restarts: dict[int, asyncio.Task[None]] = {}
        self._held: list[socket.socket] = []
        self._stopping = False
        self._unix_socket = OwnedSocket(settings.unix_socket)  # front process 0 binds it

    async def start(self) -> int:
        """Start every front process; the first binds the port (a free one for port 0), the
        others join it."""
        for index in range(self._settings.fronts):
            await self._start_one(index)
            self._if_gone(index)
        return self._port

    def _config(self, index: int) -> bytes:
        s = self._settings
        return s.model_copy(update={
            "port": self._port,
            "unix_socket": s.unix_socket if index == 0 else None,  # a path is bound by one process only
        }).model_dump_json().encode()  # fmt: skip

    async def _start_one(self, index: int) -> None:
        """Start front process ``index`` and wait until it serves; only then is it tracked (stopped,
        started again when it dies), so one that fails to start is its caller's to retry."""
        ours, theirs = socket.socketpair()
        with ours, theirs:
            fd = theirs.fileno()
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "infer_server.relay", str(fd), str(index), self._settings.event_loop,
                pass_fds=(fd,),
            )
            calls = RelayedCalls(self._handlers, self._gate, self._budget, lambda: self._lost(index, process))
            loop = asyncio.get_running_loop()
            await loop.connect_accepted_socket(lambda: calls.link, ours.dup())
        calls.link.send(LINK, Kind.CONFIG, self._config(index))
        try:
            self._port = await asyncio.wait_for(asyncio.shield(calls.ready), _READY_TIMEOUT_S)
        except BaseException:
            calls.link.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        self._processes[index], self._links[index] = process, calls
        if not self._held:
            self._held = _hold_port(self._settings.host, self._port)
            self._unix_socket.claim()
        log.info("front process %d (pid %d) serves port %d", index, process.pid, self._port)

    def _lost(self, index: int, process: asyncio.subprocess.Process) -> None:
        """A link closed: if it was a serving front process's, start that one again (once)."""
        if self._stopping or self._processes.get(index) is not process or index in self._restarts:
            return
        self._restarts[index] = asyncio.ensure_future(self._restart(index, process))

    def _if_gone(self, index: int) -> None:
        """A front process whose link closed in the moment it was registered (its loss was not
        yet its own) is started again like any other."""
        if index in self._links and self._links[index].link.closed:
            self._lost(index, self._processes[index])

    async def _restart(self, index: int, process: asyncio.subprocess.Process) -> None:
        """Start a front process that died again, backing off while it keeps dying."""
        try:
            code = await process.wait()
            self._on_exit()
            log.warning("front process %d (pid %d) exited with %s: starting it again", index, process.pid, code)
            if not await start_again(lambda: self._start_one(index), _RESTART_DELAYS_S, lambda: self._stopping,
                                     f"front process {index}"):  # fmt: skip
                return
        finally:
            del self._restarts[index]
        self._if_gone(index)

    async def stop(self, grace: float) -> None:
        """Every front process stops serving (open calls may end within ``grace``) and exits."""
        self._stopping = True
        restarting = list(self._restarts.values())
        for task in restarting:
            task.cancel()
        await asyncio.gather(*restarting, return_exceptions=True)  # one half-started is killed first
        for calls in self._links.values():
            calls.link.send(LINK, Kind.STOP, repr(grace).encode())
        for process in self._processes.values():
            await wait_or_kill(process, grace + 5.0, "front process")
        for calls in self._links.values():
            calls.link.close()
        for sock in self._held:
            sock.close()
        self._unix_socket.remove()


class Front(Protocol):
    async def start(self) -> int: ...

    async def stop(self, grace: float) -> None: ...


class Fronts:
    """The gRPC front (none in a shard other than the main process) and the local socket, started
    and stopped together."""

    def __init__(
        self, grpc_front: Front | None, path: Path, handlers: Handlers, gate: Gates, settings: ServerSettings
    ) -> None:
        self._grpc = grpc_front
        s = settings  # no pings here: a client that reads nothing for as long as either would end it is gone
        stall_s = max(s.keepalive_s + s.keepalive_timeout_s, s.stream_idle_timeout_s)
        self._local = LocalFront(path, handlers, gate, s.max_concurrent_rpcs, s.max_message_bytes,
                                 idle_s=s.stream_idle_timeout_s, stall_s=stall_s)  # fmt: skip

    async def start(self) -> int:
        port = await self._grpc.start() if self._grpc is not None else 0
        try:
            await self._local.start()
        except BaseException:
            if self._grpc is not None:
                await self._grpc.stop(0)
            raise
        return port

    async def stop(self, grace: float) -> None:
        await asyncio.gather(self._local.stop(grace), *([self._grpc.stop(grace)] if self._grpc is not None else []))


def make_front(settings: ServerSettings, handlers: Handlers, gate: Gates, on_exit: Callable[[], None],
               relay: socket.socket | None = None) -> Front:  # fmt: skip
    """The fronts the settings ask for: gRPC in this process or in front processes, and the local
    socket; in a shard, the gRPC calls the main process relays over ``relay`` (``front.shard_relay``)."""
    grpc_front: Front | None
    if settings.shard_index:  # a shard the main process started: gRPC is the main process's
        grpc_front = None if relay is None else FromMain(relay, handlers, gate, settings.max_concurrent_rpcs)
    elif settings.fronts:
        grpc_front = FrontProcesses(settings, handlers, gate, on_exit)
    else:
        grpc_front = InProcessFront(settings, handlers, gate)
    if settings.local_socket is None:
        assert grpc_front is not None  # shards need the local socket (the settings' validation)
        return grpc_front
    return Fronts(grpc_front, settings.local_socket, handlers, gate, settings)
