"""The relay (``--fronts``): the link's frames, and a call's whole path through a front process.

The end-to-end tests run both halves on one loop: a grpc.aio server whose only handler is
``relay.process.Relay``, linked by a socket pair to ``front.relayed.RelayedCalls`` serving real
handlers; a grpc.aio client calls the server. Only the process boundary is missing (the
integration tests run the whole suite with ``--fronts 2`` for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from infer_proto.framing import HEADER, LINK, Kind, decode_end, encode_end
from infer_server.front import relayed
from infer_server.front.relayed import CallBudget, Handlers, RelayedCalls
from infer_server.relay.link import Link, decode_start, encode_start
from infer_server.relay.process import Relay

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_frames_arrive_whole_however_the_bytes_are_split() -> None:
    got: list[tuple[int, int, bytes]] = []
    link = Link(lambda *frame: got.append(frame), lambda: None)
    wire = (HEADER.pack(3, Kind.MESSAGE, 5) + b"hello" + HEADER.pack(LINK, Kind.READY, 0)
            + HEADER.pack(7, Kind.END, 3) + b"abc")  # fmt: skip
    for i in range(len(wire)):
        link.data_received(wire[i : i + 1])
    link.data_received(wire)  # and all at once
    expected = [(3, Kind.MESSAGE, b"hello"), (LINK, Kind.READY, b""), (7, Kind.END, b"abc")]
    assert got == expected * 2


def test_call_ids_never_wrap_in_a_process_life() -> None:
    got: list[tuple[int, int, bytes]] = []
    link = Link(lambda *frame: got.append(frame), lambda: None)
    link.data_received(HEADER.pack(2**40 + 5, Kind.WANT, 0))  # 2**32 calls are a day at 50k calls/s
    assert got == [(2**40 + 5, Kind.WANT, b"")]


def test_the_frames_of_one_turn_of_the_loop_go_out_in_one_write() -> None:
    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []

        def write(self, data: Any) -> None:
            self.writes.append(bytes(data))

    async def scenario() -> list[bytes]:
        link, transport = Link(lambda *frame: None, lambda: None), Transport()
        link.connection_made(transport)
        link.send(1, Kind.WANT)
        link.send(2, Kind.MESSAGE, b"xyz")
        await asyncio.sleep(0)
        link.send(1, Kind.ACK)
        await asyncio.sleep(0)
        return transport.writes

    writes = run(scenario())
    first_turn = HEADER.pack(1, Kind.WANT, 0) + HEADER.pack(2, Kind.MESSAGE, 3) + b"xyz"
    assert writes == [first_turn, HEADER.pack(1, Kind.ACK, 0)]


def test_a_start_carries_binary_metadata_and_the_auth_context() -> None:
    start = encode_start("/s/M", [("authorization", "Bearer x"), ("trace-bin", b"\x00\xff")], "ipv4:1.2.3.4:5",
                         {"x509_common_name": [b"client-a"]})  # fmt: skip
    assert decode_start(start) == (
        "/s/M", (("authorization", "Bearer x"), ("trace-bin", b"\x00\xff")), "ipv4:1.2.3.4:5",
        {"x509_common_name": [b"client-a"]},
    )  # fmt: skip
    assert decode_end(encode_end(7, "no")) == (7, "no")


class Probe:
    """Handlers of a test service (raw bytes), recording what the relayed side saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.peers: list[str] = []
        self.metadata: list[Any] = []

    async def echo(self, request: bytes, context: Any) -> bytes:
        self.peers.append(context.peer())
        self.metadata.append(dict(context.invocation_metadata()))
        return request.upper()

    async def refuse(self, request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")
        raise AssertionError("abort returned")

    async def crash(self, request: bytes, context: Any) -> bytes:
        raise ValueError("a bug")

    async def chat(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request[::-1]

    async def hang(self, request: bytes, context: Any) -> None:
        await context.write(b"first")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Probe", {
            "Echo": grpc.unary_unary_rpc_method_handler(self.echo),
            "Refuse": grpc.unary_unary_rpc_method_handler(self.refuse),
            "Crash": grpc.unary_unary_rpc_method_handler(self.crash),
            "Chat": grpc.stream_stream_rpc_method_handler(self.chat),
            "Hang": grpc.unary_stream_rpc_method_handler(self.hang),
        }),))  # fmt: skip
        return handlers


@contextlib.asynccontextmanager
async def relayed_server(
    handlers: Handlers, gate: Any = (), budget: int = 100
) -> AsyncIterator[tuple[grpc.aio.Channel, RelayedCalls, Relay]]:
    """A gRPC server on a free port whose calls go through a Relay and a link to ``handlers``."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    calls = RelayedCalls(handlers, gate, CallBudget(budget), lambda: None)
    await loop.connect_accepted_socket(lambda: calls.link, ours)
    relay = Relay()
    await loop.connect_accepted_socket(lambda: relay.link, theirs)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((relay,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, calls, relay
    finally:
        await server.stop(0)
        calls.link.close()
        relay.link.close()
        for never_sent in (calls.ready, relay.config):  # no front process here: no port, no settings
            never_sent.cancel()


def test_unary_calls_reach_the_handler_with_their_metadata_and_peer_and_keep_their_status() -> None:
    probe = Probe()

    async def scenario() -> None:
        async with relayed_server(probe.handlers()) as (channel, _, _):
            echo = channel.unary_unary("/test.Probe/Echo")
            assert await echo(b"abc", metadata=(("who", "me"), ("blob-bin", b"\x01"))) == b"ABC"
            for method, code in (("Refuse", grpc.StatusCode.PERMISSION_DENIED), ("Crash", grpc.StatusCode.UNKNOWN),
                                 ("Missing", grpc.StatusCode.UNIMPLEMENTED)):  # fmt: skip
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await channel.unary_unary(f"/test.Probe/{method}")(b"x")
                assert caught.value.code() == code
            assert caught.value.details() == "Method not found!"

    run(scenario())
    assert probe.peers[0].startswith("ipv4:127.0.0.1:")
    assert probe.metadata[0]["who"] == "me" and probe.metadata[0]["blob-bin"] == b"\x01"


def test_a_bidirectional_stream_is_relayed_message_by_message() -> None:
    async def scenario() -> list[bytes]:
        async with relayed_server(Probe().handlers()) as (channel, _, _):
            call = channel.stream_stream("/test.Probe/Chat")()
            replies = []
            for word in (b"one", b"two", b"three"):
                await call.write(word)
                replies.append(await call.read())
            await call.done_writing()
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            return replies

    assert run(scenario()) == [b"eno", b"owt", b"eerht"]


@pytest.mark.parametrize("gone", ["client", "front process"])
def test_a_call_whose_other_end_goes_away_cancels_the_relayed_handler(gone: str) -> None:
    """A client that cancels (the front process's CANCEL), or a front process whose link closes:
    the handler's task is cancelled, as grpc.aio cancels it; a client whose front process lost the
    main process gets UNAVAILABLE."""
    probe = Probe()

    async def scenario() -> None:
        async with relayed_server(probe.handlers()) as (channel, calls, relay):
            call = channel.unary_stream("/test.Probe/Hang")(b"x")
            assert await call.read() == b"first"
            if gone == "client":
                call.cancel()
            else:
                relay.link.close()  # both ends see the link go: the main side cancels, the front side ends
            await asyncio.wait_for(probe.cancelled.wait(), 10)
            if gone == "front process":
                assert await call.code() == grpc.StatusCode.UNAVAILABLE
                assert calls.link.closed

    run(scenario())


def test_a_call_the_gate_refuses_is_answered_without_reading_its_message(monkeypatch: pytest.MonkeyPatch) -> None:
    delivered: list[bytes | None] = []
    deliver = relayed.RelayedCall.deliver
    monkeypatch.setattr(relayed.RelayedCall, "deliver", lambda self, raw: (delivered.append(raw), deliver(self, raw)))

    class Gate(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if details.method.endswith("/Echo"):
                async def refuse(requests: Any, context: Any) -> None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you")
                return grpc.stream_stream_rpc_method_handler(refuse)
            return await continuation(details)

    async def scenario() -> None:
        async with relayed_server(Probe().handlers(), (Gate(),)) as (channel, _, _):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Probe/Echo")(b"x" * 100_000)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await channel.stream_stream("/test.Probe/Chat")(iter([b"ok"])).read() == b"ko"

    run(scenario())
    assert b"ok" in delivered and b"x" * 100_000 not in delivered  # only the call the gate let through was read


def test_grpc_health_is_served_through_the_relay() -> None:
    async def scenario() -> list[int]:
        servicer = health.aio.HealthServicer()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        handlers = Handlers()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, handlers)
        async with relayed_server(handlers) as (channel, _, _):
            stub = health_pb2_grpc.HealthStub(channel)
            statuses = [(await stub.Check(health_pb2.HealthCheckRequest(service=""))).status]
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            statuses.append((await watch.read()).status)
            await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            statuses.append((await watch.read()).status)
            watch.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Check(health_pb2.HealthCheckRequest(service="unknown"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            return statuses

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    assert run(scenario()) == [serving, serving, not_serving]


def test_a_call_cancelled_in_the_read_that_started_it_leaves_nothing_behind() -> None:
    """START and CANCEL in one read (a client that resets at once): the task is cancelled before it
    ran a step, and the call must still be forgotten, and its place in the budget freed."""

    async def scenario() -> tuple[int, int]:
        budget = CallBudget(10)
        calls = RelayedCalls(Probe().handlers(), (), budget, lambda: None)
        start = encode_start("/test.Probe/Echo", (), "ipv4:127.0.0.1:1", {})
        for call_id in range(1, 101):
            calls.link.data_received(HEADER.pack(call_id, Kind.START, len(start)) + start
                                     + HEADER.pack(call_id, Kind.CANCEL, 0))  # fmt: skip
        tasks = [call.task for call in calls._calls.values() if call.task is not None]
        await asyncio.gather(*tasks, return_exceptions=True)  # every call's task, cancelled, has ended
        return len(calls._calls), budget.open

    assert run(scenario()) == (0, 0)


def test_concurrent_calls_are_bounded_over_every_front_process() -> None:
    """--max-concurrent-rpcs bounds relayed calls in the main process, whichever front they came
    through; one past it is refused as gRPC refuses it, and a call that ended frees its place."""
    probe = Probe()

    async def scenario() -> None:
        async with relayed_server(probe.handlers(), budget=1) as (channel, calls, _):
            hang = channel.unary_stream("/test.Probe/Hang")(b"x")
            assert await hang.read() == b"first"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await channel.unary_unary("/test.Probe/Echo")(b"x")
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            (held,) = [call.task for call in calls._calls.values() if call.task is not None]
            hang.cancel()
            await asyncio.wait_for(asyncio.wait([held]), 10)  # the main side's task of the call ended
            assert await channel.unary_unary("/test.Probe/Echo")(b"x") == b"X"

    run(scenario())


class FakeChild:
    """Stands in for a front process's interpreter (``asyncio.subprocess.Process``'s surface)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.returncode = pid, None
        self._exited = asyncio.Event()

    async def wait(self) -> int | None:
        await self._exited.wait()
        return self.returncode

    def kill(self) -> None:
        self.exit(-9)

    def exit(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set()


class Spawner:
    """``asyncio.create_subprocess_exec`` for ``FrontProcesses``: the n-th child does ``fates[n]``
    ("serve": report a port and stay until told to stop; "ready-then-die": report a port and exit
    in the same breath; "die": exit before reporting anything). ``spawned`` is set at each spawn."""

    def __init__(self, fates: list[str]) -> None:
        self.fates, self.children, self.links = fates, [], []
        self.spawned = asyncio.Event()
        self._watchers: list[asyncio.Future[None]] = []

    async def __call__(self, *args: Any, pass_fds: tuple[int, ...] = (), **kwargs: Any) -> FakeChild:
        fate = self.fates[len(self.children)] if len(self.children) < len(self.fates) else "serve"
        child = FakeChild(1000 + len(self.children))
        link = socket.socket(fileno=os.dup(pass_fds[0]))
        if fate != "die":
            link.sendall(HEADER.pack(LINK, Kind.READY, 5) + b"40000")
        if fate == "serve":
            self.links.append(link)
            self._watchers.append(asyncio.ensure_future(self._stop_when_told(link, child)))
        else:
            link.close()
            child.exit(1)
        self.children.append(child)
        self.spawned.set()
        return child

    async def until(self, count: int) -> None:
        while len(self.children) < count:
            self.spawned.clear()
            await asyncio.wait_for(self.spawned.wait(), 10)

    async def _stop_when_told(self, link: socket.socket, child: FakeChild) -> None:
        link.setblocking(False)
        received = b""
        while chunk := await asyncio.get_running_loop().sock_recv(link, 65536):
            received += chunk
            while len(received) >= HEADER.size:
                _, kind, length = HEADER.unpack_from(received)
                if kind == Kind.STOP:
                    child.exit(0)
                    return
                received = received[HEADER.size + length :]

    def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        for link in self.links:
            link.close()


@contextlib.asynccontextmanager
async def fake_fronts(monkeypatch: pytest.MonkeyPatch, spawner: Spawner) -> AsyncIterator[Any]:
    from infer_server.front import fronts
    from infer_server.settings import ServerSettings

    monkeypatch.setattr(fronts.asyncio, "create_subprocess_exec", spawner)
    monkeypatch.setattr(fronts, "_RESTART_DELAYS_S", (0.01,))
    monkeypatch.setattr(fronts, "_hold_port", lambda host, port: [])
    front = fronts.FrontProcesses(ServerSettings(fronts=1, port=0), Handlers(), ())
    try:
        yield front
    finally:
        await front.stop(0.1)
        spawner.close()


@pytest.mark.parametrize("fates", [["ready-then-die"], ["serve", "ready-then-die"]],
                         ids=["at-first-start", "after-a-restart"])  # fmt: skip
def test_a_front_process_that_dies_as_it_reports_ready_is_started_again(
    monkeypatch: pytest.MonkeyPatch, fates: list[str]
) -> None:
    """Its READY and the link's end can arrive in one read: it must still count as lost."""
    spawner = Spawner(fates)

    async def scenario() -> list[int | None]:
        async with fake_fronts(monkeypatch, spawner) as front:
            await front.start()
            if fates[0] == "serve":  # the first serves, then dies; its replacement dies as it reports ready
                spawner.links[0].close()
                spawner.children[0].exit(1)
            await spawner.until(len(fates) + 1)
            return [child.returncode for child in spawner.children]

    codes = run(scenario())
    assert len(codes) == len(fates) + 1 and codes[-1] is None  # started again, and that one serves


def test_a_front_process_that_cannot_start_again_is_retried_by_one_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A front process that keeps failing to start (its port or socket path taken, say) is retried
    by one loop only: each failed start used to add a loop, and once the cause was gone each loop
    started a front process of its own, untracked."""
    spawner = Spawner(["serve", "die", "die", "die"])

    async def scenario() -> tuple[list[int], list[int | None]]:
        async with fake_fronts(monkeypatch, spawner) as front:
            await front.start()
            spawner.links[0].close()
            spawner.children[0].exit(1)
            loops = []
            for count in (2, 3, 4, 5):  # three failed starts, then one that serves
                await spawner.until(count)
                loops.append(sum(1 for task in asyncio.all_tasks()
                                 if task.get_coro().__qualname__ == "FrontProcesses._restart"))  # type: ignore[union-attr]
            return loops, [child.returncode for child in spawner.children]

    loops, codes = run(scenario())
    assert loops[:3] == [1, 1, 1]
    assert codes == [1, 1, 1, 1, None]


@pytest.mark.skipif(os.geteuid() != 0 or not socket.has_ipv6, reason="needs root (to be another user) and IPv6")
def test_a_wildcard_port_is_held_on_ipv4_and_ipv6() -> None:
    """gRPC binds a wildcard host dual-stack: while the front processes start again, nobody else
    may bind the port on either family (an IPv6-only socket would take the IPv6 clients)."""
    from infer_server.front.fronts import _hold_port

    with socket.socket() as probe:
        probe.bind(("0.0.0.0", 0))
        port = probe.getsockname()[1]
    held = _hold_port("0.0.0.0", port)
    squat = (
        "import os, socket\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "for family, address, v6only in ((socket.AF_INET, '0.0.0.0', 0), (socket.AF_INET6, '::', 1)):\n"
        "    s = socket.socket(family)\n"
        "    if v6only: s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "    try:\n"
        f"        s.bind((address, {port})); print('bound', address)\n"
        "    except OSError as exc:\n"
        "        print('refused', address, exc.errno)\n"
    )
    try:
        out = subprocess.run([sys.executable, "-c", squat], capture_output=True, text=True, timeout=30).stdout
    finally:
        for sock in held:
            sock.close()
    assert "bound" not in out and out.count("refused") == 2, out
