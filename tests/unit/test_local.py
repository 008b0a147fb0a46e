"""The local socket (``--local-socket``): calls without gRPC, from a client nobody vouches for.

A ``LocalFront`` on a socket in a temporary directory serves the test handlers of ``test_relay``
(``Probe``) on the test's loop; the tests speak the frames to it by hand, as a client would, and
as a hostile one might. The client library's side (``infer_client.local``) runs against the real
server in the integration tests (``make test`` runs them all once more with ``--local-socket``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import stat
import threading
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from infer_client import InferError, LocalSession
from infer_client._batch_files import BatchFiles
from infer_client._protocol import PushedBatches
from infer_client.local import message_parts
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, decode_call_start, decode_end, encode_call_start, frame
from infer_server.front.listen import replace_leftover_socket
from infer_server.front.local import WINDOW, LocalCall, LocalCalls, LocalFront, LocalLink
from infer_server.front.relayed import Handlers
from tests.unit.test_relay import Probe, run

MAX_MESSAGE = 1000  # the front's --max-message-bytes: frames up to twice that


class Client:
    """One connection to the local socket, frames by hand."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def start(self, call: int, method: str, metadata: Any = ()) -> None:
        self.send(frame(call, Kind.START, encode_call_start(method, metadata)))

    async def receive(self) -> tuple[int, int, bytes]:
        call, kind, length = HEADER.unpack(await self.reader.readexactly(HEADER.size))
        return call, kind, await self.reader.readexactly(length)

    async def expect(self, kind: Kind) -> bytes:
        got = await self.receive()
        assert got[1] == kind, got
        return got[2]

    async def closed_by_server(self) -> bool:
        """Everything the server still sends, until it closes the connection."""
        with contextlib.suppress(ConnectionError):  # reset, or a broken pipe under what it still sends
            while await self.reader.read(65536):
                pass
        return True

    async def hang(self) -> None:
        """Call 1: ``Probe.hang``, until it wrote its first message (it then waits to be cancelled)."""
        await self.start(1, "/test.Probe/Hang")
        await self.expect(Kind.WANT)
        self.send(frame(1, Kind.MESSAGE, b"x"), frame(1, Kind.HALF_CLOSE))
        assert await self.expect(Kind.MESSAGE) == b"first"

    async def unary(self, method: str, request: bytes, metadata: Any = (), call: int = 1) -> tuple[int, str, bytes]:
        await self.start(call, method, metadata)
        if (got := await self.receive())[1] == Kind.END:  # answered without reading (no such method)
            return (*decode_end(got[2]), b"")
        assert got[1] == Kind.WANT, got
        self.send(frame(call, Kind.MESSAGE, request), frame(call, Kind.HALF_CLOSE))
        response = b""
        while (got := await self.receive())[1] != Kind.END:
            if got[1] == Kind.MESSAGE:
                response = got[2]
        code, details = decode_end(got[2])
        return code, details, response


@contextlib.asynccontextmanager
async def local_front(
    tmp_path: Path, handlers: Handlers, gate: Any = (), limit: int = 100, max_message: int = MAX_MESSAGE,
    **timing: float,
) -> AsyncIterator[tuple[LocalFront, Any]]:
    front = LocalFront(tmp_path / "local.sock", handlers, gate, limit, max_message, **timing)
    await front.start()

    async def connect() -> Client:
        return Client(*await asyncio.open_unix_connection(str(front.path)))

    try:
        yield front, connect
    finally:
        await front.stop(0)


def test_a_call_is_served_by_the_handlers_with_the_kernels_word_for_its_peer(tmp_path: Path) -> None:
    probe = Probe()

    async def scenario() -> tuple[tuple[int, str, bytes], ...]:
        async with local_front(tmp_path, probe.handlers()) as (_, connect):
            client = await connect()
            forged = frame(1, Kind.START, b'{"method": "/test.Probe/Echo", "metadata": [["who", "me"]], '
                           b'"peer": "ipv4:10.0.0.1:1", "auth": {"x509_common_name": ["YWRtaW4="]}}')  # fmt: skip
            client.send(forged)
            await client.expect(Kind.WANT)
            client.send(frame(1, Kind.MESSAGE, b"abc"), frame(1, Kind.HALF_CLOSE))
            assert await client.expect(Kind.MESSAGE) == b"ABC"
            first = decode_end(await client.expect(Kind.END))
            return (first + (b"",), await client.unary("/test.Probe/Refuse", b"x", call=2),
                    await client.unary("/test.Probe/Missing", b"x", call=3))  # fmt: skip

    echo, refused, missing = run(scenario())
    assert echo[:2] == (0, "")
    assert probe.peers == [f"local:pid={os.getpid()},uid={os.getuid()}"]  # not what the start said
    assert probe.metadata == [{"who": "me"}]
    assert refused[:2] == (grpc.StatusCode.PERMISSION_DENIED.value[0], "not yours")
    assert missing[:2] == (grpc.StatusCode.UNIMPLEMENTED.value[0], "Method not found!")


def test_a_streams_small_messages_flow_on_one_grant_of_the_window(tmp_path: Path) -> None:
    async def scenario() -> tuple[list[bytes], list[bytes]]:
        async with local_front(tmp_path, Probe().handlers()) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Probe/Chat")
            grants = [await client.expect(Kind.WANT)]
            client.send(*(frame(1, Kind.MESSAGE, word) for word in (b"one", b"two", b"three")))
            client.send(frame(1, Kind.HALF_CLOSE))
            got = []
            while (frame_ := await client.receive())[1] != Kind.END:
                (got if frame_[1] == Kind.MESSAGE else grants).append(frame_[2])
            assert decode_end(frame_[2]) == (0, "")
            return got, grants

    got, grants = run(scenario())
    assert got == [b"eno", b"owt", b"eerht"]
    assert grants == [str(WINDOW).encode()]  # one WANT for the three


def test_a_client_sending_past_its_window_loses_its_connection(tmp_path: Path) -> None:
    probe = Probe()
    half = b"x" * (WINDOW * 5 // 8)

    async def scenario() -> bool:
        async with local_front(tmp_path, probe.handlers(), max_message=WINDOW) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Probe/Hang")  # reads one message, and asks for nothing more
            assert await client.expect(Kind.WANT) == str(WINDOW).encode()
            client.send(frame(1, Kind.MESSAGE, half))
            assert await client.expect(Kind.MESSAGE) == b"first"
            client.send(frame(1, Kind.MESSAGE, half))  # sent while under the window: it may overdraw
            client.send(frame(1, Kind.MESSAGE, b"one byte too many"))
            await asyncio.wait_for(probe.cancelled.wait(), 5)
            return await asyncio.wait_for(client.closed_by_server(), 5)

    assert run(scenario())


VIOLATIONS = {
    "a frame longer than twice the message limit": HEADER.pack(1, Kind.MESSAGE, 2 * MAX_MESSAGE + 1),
    "a message nobody asked for": frame(1, Kind.START, encode_call_start("/test.Probe/Chat", ()))
    + frame(1, Kind.MESSAGE, b"unasked"),
    "a message after the half-close": frame(1, Kind.START, encode_call_start("/test.Probe/Chat", ()))
    + frame(1, Kind.HALF_CLOSE) + frame(1, Kind.MESSAGE, b"late"),
    "a start of call 0": frame(0, Kind.START, encode_call_start("/test.Probe/Echo", ())),
    "a call id that does not grow": frame(5, Kind.START, encode_call_start("/test.Probe/Chat", ()))
    + frame(3, Kind.START, encode_call_start("/test.Probe/Echo", ())),
    "a start that is not JSON": frame(1, Kind.START, b"\x00not json"),
    "a start nested too deep to parse": frame(1, Kind.START, b"[" * 60_000),
    "a start without a method": frame(1, Kind.START, b'{"metadata": []}'),
    "a start with bad binary metadata": frame(1, Kind.START, b'{"method": "/m", "metadata": [["a-bin", "%%"]]}'),
    "a frame for a call never started": frame(9, Kind.MESSAGE, b"x"),
    "the header of a message for a call never started (its payload never comes)": HEADER.pack(9, Kind.MESSAGE, 1000),
    "a half-close with a payload": frame(1, Kind.START, encode_call_start("/test.Probe/Chat", ()))
    + frame(1, Kind.HALF_CLOSE, b"x"),
    "more empty messages than the window holds": frame(1, Kind.START, encode_call_start("/test.Probe/Hang", ()))
    + b"".join(frame(1, Kind.MESSAGE) for _ in range(WINDOW // HEADER.size + 2)),
    **{f"a {kind.name} frame, the server's to send": frame(1, kind)
       for kind in (Kind.CONFIG, Kind.READY, Kind.STOP, Kind.WANT, Kind.ACK, Kind.END)},
}  # fmt: skip


@pytest.mark.parametrize("bad", VIOLATIONS.values(), ids=VIOLATIONS.keys())
def test_a_client_breaking_the_protocol_loses_its_connection_and_nobody_else_does(tmp_path: Path, bad: bytes) -> None:
    probe = Probe()

    async def scenario() -> tuple[bool, tuple[int, str, bytes]]:
        async with local_front(tmp_path, probe.handlers()) as (_, connect):
            other = await connect()
            bystander = await other.unary("/test.Probe/Echo", b"before")
            client = await connect()
            client.send(bad)
            dropped = await asyncio.wait_for(client.closed_by_server(), 5)
            assert bystander[2] == b"BEFORE"
            return dropped, await other.unary("/test.Probe/Echo", b"after", call=2)

    dropped, after = run(scenario())
    assert dropped and after == (0, "", b"AFTER")


@pytest.mark.parametrize("how", ["it breaks the protocol", "its client goes away"])
def test_a_connection_that_ends_cancels_its_calls(tmp_path: Path, how: str) -> None:
    probe = Probe()

    async def scenario() -> None:
        async with local_front(tmp_path, probe.handlers()) as (front, connect):
            client = await connect()
            await client.hang()
            if how == "it breaks the protocol":
                client.send(frame(1, Kind.ACK))  # a front process's frame: not a client's
            else:
                client.writer.close()
            await asyncio.wait_for(probe.cancelled.wait(), 5)
            if how == "it breaks the protocol":
                await asyncio.wait_for(client.closed_by_server(), 5)
            while front.connections:  # the server forgets it
                await asyncio.sleep(0)

    run(scenario())


def test_calls_over_the_limit_are_refused_unread(tmp_path: Path) -> None:
    probe = Probe()

    async def scenario() -> tuple[int, str]:
        async with local_front(tmp_path, probe.handlers(), limit=1) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Probe/Hang")
            await client.expect(Kind.WANT)
            await client.start(2, "/test.Probe/Echo")
            return decode_end(await client.expect(Kind.END))  # no WANT first: nothing of it is read

    assert run(scenario()) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "Concurrent RPC limit exceeded!")


def test_a_call_the_gate_refuses_is_answered_before_any_message_is_asked_for(tmp_path: Path) -> None:
    class Gate(grpc.aio.ServerInterceptor):
        async def intercept_service(self, continuation: Any, details: Any) -> Any:
            if dict(details.invocation_metadata).get("authorization") != "Bearer good":
                async def refuse(requests: Any, context: Any) -> None:
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "who are you")
                return grpc.stream_stream_rpc_method_handler(refuse)
            return await continuation(details)

    async def scenario() -> tuple[tuple[int, str], tuple[int, str, bytes]]:
        async with local_front(tmp_path, Probe().handlers(), (Gate(),)) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Probe/Echo")
            refused = decode_end(await client.expect(Kind.END))  # the first frame: no WANT before it
            let_in = await client.unary("/test.Probe/Echo", b"hi", (("authorization", "Bearer good"),), call=2)
            return refused, let_in

    refused, let_in = run(scenario())
    assert refused == (grpc.StatusCode.UNAUTHENTICATED.value[0], "who are you")
    assert let_in == (0, "", b"HI")


def test_stopping_refuses_new_calls_ends_open_ones_after_the_grace_and_removes_the_socket(tmp_path: Path) -> None:
    probe = Probe()

    async def scenario() -> tuple[tuple[int, str], bool]:
        front = LocalFront(tmp_path / "local.sock", probe.handlers(), (), 100, MAX_MESSAGE)
        await front.start()
        holder = Client(*await asyncio.open_unix_connection(str(front.path)))
        late = Client(*await asyncio.open_unix_connection(str(front.path)))
        await holder.hang()
        stopping = asyncio.ensure_future(front.stop(0.5))
        while not front.stopping:
            await asyncio.sleep(0)
        await late.start(1, "/test.Probe/Echo")
        refused = decode_end(await late.expect(Kind.END))
        await stopping
        return refused, probe.cancelled.is_set()

    refused, cancelled = run(scenario())
    assert refused == (grpc.StatusCode.UNAVAILABLE.value[0], "the server is stopping")
    assert cancelled
    assert not (tmp_path / "local.sock").exists()


def test_the_socket_is_private_and_nothing_but_a_leftover_socket_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> int:
        async with local_front(tmp_path, Probe().handlers()) as (front, _):
            return stat.S_IMODE(os.stat(front.path).st_mode)

    assert run(scenario()) == 0o600
    (tmp_path / "local.sock").write_text("not a socket")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        run(LocalFront(tmp_path / "local.sock", Handlers(), (), 1, MAX_MESSAGE).start())
    assert (tmp_path / "local.sock").read_text() == "not a socket"


class FakeCalls:
    """What a ``LocalLink`` reports to: the calls whose writes it acknowledged."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.peer, self.refused = "", False

    def written(self, call_id: int) -> None:
        self.acked.append(call_id)

    def on_frame(self, *frame: Any) -> None: ...

    def lost(self) -> None: ...


class FakeTransport(asyncio.Transport):
    """A transport that keeps what it was given (its client reads none of it), closing when the
    test says."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__({"socket": sock})
        self.unsent, self.reading, self.closing = 0, True, False
        self.aborted = asyncio.Event()

    def write(self, data: Any) -> None:
        self.unsent += len(data)

    def close(self) -> None: ...  # unsent bytes: nothing happens until the client reads them

    def abort(self) -> None:
        self.aborted.set()

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closing


def fake_link(calls: FakeCalls, stall_s: float = 60.0) -> tuple[LocalLink, FakeTransport]:
    link = LocalLink(calls, 100, stall_s=stall_s)  # type: ignore[arg-type]
    ours, theirs = socket.socketpair()
    transport = FakeTransport(ours)
    with ours, theirs:
        link.connection_made(transport)
    return link, transport


def test_a_response_counts_as_written_only_once_the_socket_took_it() -> None:
    async def scenario() -> list[tuple[list[int], bool]]:
        calls = FakeCalls()
        link, transport = fake_link(calls)
        assert calls.peer == f"local:pid={os.getpid()},uid={os.getuid()}"
        seen = []
        link.pause_writing()  # the client stopped reading: the socket's buffer is over its high water mark
        link.send(1, Kind.MESSAGE, b"a")
        link.send(2, Kind.WANT)
        await asyncio.sleep(0)
        seen.append((list(calls.acked), transport.reading))
        link.send(3, Kind.MESSAGE, b"x" * (8 << 20))  # past the cap: its requests are not read either
        await asyncio.sleep(0)
        seen.append((list(calls.acked), transport.reading))
        link.resume_writing()
        seen.append((list(calls.acked), transport.reading))
        link.send(2, Kind.MESSAGE, b"b")
        await asyncio.sleep(0)
        seen.append((list(calls.acked), transport.reading))
        link.connection_lost(None)
        return seen

    assert run(scenario()) == [([], True), ([], False), ([1, 3], True), ([1, 3, 2], True)]


def test_a_response_to_a_client_that_went_away_is_not_counted_as_written() -> None:
    """Finding (review): a response is acknowledged as it is sent on the local socket. When the
    client's end fails or ends, the transport is closing and drops what it is given, and
    ``connection_lost`` (which cancels the calls, whose results then go back) comes a callback
    later: a write in between was acknowledged, its results counted as delivered and lost."""

    async def scenario() -> tuple[list[int], list[int]]:
        calls = FakeCalls()
        link, transport = fake_link(calls)
        link.send(1, Kind.MESSAGE, b"a")
        open_acks = list(calls.acked)
        transport.closing = True  # the client's end broke; connection_lost is on its way
        link.send(1, Kind.MESSAGE, b"b")
        link.send(2, Kind.MESSAGE, b"c")
        await asyncio.sleep(0)
        link.connection_lost(None)
        return open_acks, calls.acked

    assert run(scenario()) == ([1], [1])


def test_a_stream_writing_a_backlog_lets_the_loop_run_meanwhile(tmp_path: Path) -> None:
    """Finding (review): a local response is acknowledged as it is sent, so a stream with many
    results ready (PullResult, a Session's backlog) wrote them all in one step of its task while
    nothing else on the loop ran: 20,000 messages held it for 100 ms. It yields every few."""
    count, ticks = 160, [0]
    seen: list[int] = []

    async def many(request: bytes, context: Any) -> None:
        start = ticks[0]
        for _ in range(count):
            await context.write(b"r")
        seen.append(ticks[0] - start)

    async def ticker() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0)

    handlers = Handlers()
    handlers.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Many", {
        "Many": grpc.unary_stream_rpc_method_handler(many)}),))  # fmt: skip

    async def scenario() -> int:
        async with local_front(tmp_path, handlers) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Many/Many")
            await client.expect(Kind.WANT)
            running = asyncio.ensure_future(ticker())
            client.send(frame(1, Kind.MESSAGE, b"x"), frame(1, Kind.HALF_CLOSE))
            for _ in range(count):
                assert await client.expect(Kind.MESSAGE) == b"r"
            await client.expect(Kind.END)
            running.cancel()
            return seen[0]

    assert run(scenario()) >= count // 16 - 1, "the loop ran other tasks while the stream wrote"


def test_a_start_from_a_client_is_parsed_strictly() -> None:
    assert decode_call_start(encode_call_start("/s/M", [("k", "v"), ("t-bin", b"\x00\xff")]))[:2] == (
        "/s/M", (("k", "v"), ("t-bin", b"\x00\xff")))  # fmt: skip
    for bad in (b"[]", b'{"method": 1}', b'{"method": "/m", "metadata": [["k", 1]]}', b'{"method": "/m", '
                b'"metadata": [["k"]]}', b'{"method": "/m", "metadata": {"k": "v"}}', b"\xff"):  # fmt: skip
        with pytest.raises(ValueError):
            decode_call_start(bad)


def test_a_cancel_after_the_half_close_cancels_that_call_alone(tmp_path: Path) -> None:
    probe = Probe()

    async def scenario() -> tuple[int, str, bytes]:
        async with local_front(tmp_path, probe.handlers()) as (_, connect):
            client = await connect()
            await client.hang()
            client.send(frame(1, Kind.CANCEL))
            await asyncio.wait_for(probe.cancelled.wait(), 5)
            return await client.unary("/test.Probe/Echo", b"still here", call=2)

    assert run(scenario()) == (0, "", b"STILL HERE")


def test_a_client_that_stops_reading_is_dropped_and_its_calls_cancelled(tmp_path: Path) -> None:
    probe = Probe()

    async def flood(request: bytes, context: Any) -> None:
        try:
            while True:
                await context.write(b"x" * 60_000)
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise

    handlers = Handlers()
    handlers.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Flood", {
        "Flood": grpc.unary_stream_rpc_method_handler(flood)}),))  # fmt: skip

    async def scenario() -> bool:
        async with local_front(tmp_path, handlers, stall_s=0.3) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Flood/Flood")
            await client.expect(Kind.WANT)
            client.send(frame(1, Kind.MESSAGE, b"go"), frame(1, Kind.HALF_CLOSE))
            await asyncio.wait_for(probe.cancelled.wait(), 5)  # it never read: its writer did not hang
            return await asyncio.wait_for(client.closed_by_server(), 5)

    assert run(scenario())


def test_connections_are_bounded_and_idle_ones_closed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with local_front(tmp_path, Probe().handlers(), limit=2, idle_s=0.2) as (front, connect):
            first, second, third = await connect(), await connect(), await connect()
            assert await asyncio.wait_for(third.closed_by_server(), 5)  # one over the bound
            assert (await first.unary("/test.Probe/Echo", b"a"))[2] == b"A"
            assert await asyncio.wait_for(second.closed_by_server(), 5)  # no call for the idle time
            assert await asyncio.wait_for(first.closed_by_server(), 5)  # idle after its call
            while front.connections:
                await asyncio.sleep(0)

    run(scenario())


def test_a_second_server_on_the_path_neither_takes_nor_removes_the_live_socket(tmp_path: Path) -> None:
    async def scenario() -> tuple[str, bytes]:
        async with local_front(tmp_path, Probe().handlers()) as (_, connect):
            second = LocalFront(tmp_path / "local.sock", Handlers(), (), 10, MAX_MESSAGE)
            with pytest.raises(RuntimeError) as refused:
                await second.start()
            await second.stop(0)  # as a server whose start failed stops
            client = await connect()
            return str(refused.value), (await client.unary("/test.Probe/Echo", b"a"))[2]

    refused, answer = run(scenario())
    assert "a running server listens on" in refused and answer == b"A"


def test_a_live_socket_whose_accept_queue_is_full_is_not_taken_for_a_leftover(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(path)
        live.listen(0)
        fillers = []
        for _ in range(8):  # until the queue is full: the next connect fails at once (EAGAIN)
            filler = socket.socket(socket.AF_UNIX)
            filler.setblocking(False)
            fillers.append(filler)
            try:
                filler.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(RuntimeError, match="cannot tell is unused"):
            replace_leftover_socket(Path(path), "--local-socket")
        assert os.path.exists(path)
        for filler in fillers:
            filler.close()
    replace_leftover_socket(Path(path), "--local-socket")  # nobody listens now: an earlier run's
    assert not os.path.exists(path)


def test_an_ended_call_keeps_no_request_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[weakref.ref[LocalCall]] = []

    class Recorded(LocalCall):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            calls.append(weakref.ref(self))

    monkeypatch.setattr(LocalCalls, "call_class", Recorded)

    async def scenario() -> tuple[int, str, bytes]:
        async with local_front(tmp_path, Probe().handlers(), max_message=WINDOW) as (_, connect):
            client = await connect()
            await client.start(1, "/test.Probe/Echo")
            await client.expect(Kind.WANT)
            client.send(frame(1, Kind.MESSAGE, b"a"), frame(1, Kind.MESSAGE, b"x" * 30_000))  # one too many
            assert await client.expect(Kind.MESSAGE) == b"A"
            assert decode_end(await client.expect(Kind.END)) == (0, "")
            await asyncio.sleep(0)  # the call's task is done: it gave its slot back
            gc.collect()
            assert [ref() for ref in calls] == [None]  # nor is its unread 30 kB held by the connection
            client.send(frame(1, Kind.MESSAGE, b"late"))  # still within the window it had: dropped quietly
            return await client.unary("/test.Probe/Echo", b"b", call=2)

    assert run(scenario()) == (0, "", b"B")


def test_a_closed_connection_its_client_never_reads_is_dropped_after_the_stall_time() -> None:
    async def scenario() -> None:
        link, transport = fake_link(FakeCalls(), stall_s=0.05)
        link.close()
        await asyncio.wait_for(transport.aborted.wait(), 5)

    run(scenario())


def test_closing_a_session_does_not_wait_for_a_push_held_by_the_window(tmp_path: Path) -> None:
    path = str(tmp_path / "server.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def server() -> None:  # grants 100 bytes once, then reads and answers nothing
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(frame(1, Kind.WANT, b"100"))
            while conn.recv(65536):
                pass

    serving = threading.Thread(target=server, daemon=True)
    serving.start()
    session = LocalSession(path, "inline", PushedBatches(BatchFiles(str(tmp_path))), timeout=30)
    pushes: list[BaseException] = []

    def push() -> None:
        try:
            session.push([b"x" * 500])  # the first overdraws the window, the second waits for more
        except InferError as exc:
            pushes.append(exc)

    first = threading.Thread(target=push)
    first.start()
    second = threading.Thread(target=push)
    second.start()
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (session.close(timeout=0.5), closed.set()))
    closer.start()
    assert closed.wait(10), "close() waited for the push"
    for thread in (first, second, closer):
        thread.join(10)
    assert len(pushes) == 2 and {e.code for e in pushes} <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    with pytest.raises(InferError):
        session.push([b"y"])
    listener.close()
    serving.join(10)


def test_a_thread_waiting_on_a_cancelled_session_ends_even_if_its_descriptor_is_reused(tmp_path: Path) -> None:
    """``cancel`` closes the socket while another thread waits for it to be readable. Closing does
    not wake that wait, and the socket's number may name another file at once: the waiter must
    neither sleep on that file nor wait out its timeout (here none)."""
    path = str(tmp_path / "server.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    pushed = threading.Event()

    def server() -> None:  # grants a window, takes the push, answers nothing
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(frame(1, Kind.WANT, b"100000"))
            while conn.recv(65536):
                pushed.set()

    serving = threading.Thread(target=server, daemon=True)
    serving.start()
    session = LocalSession(path, "inline", PushedBatches(BatchFiles(str(tmp_path))), timeout=None)
    number = session._sock.fileno()
    errors: list[InferError] = []

    def push() -> None:
        try:
            session.push([b"x" * 10])  # waits for its answer, which never comes
        except InferError as exc:
            errors.append(exc)

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    assert pushed.wait(10)
    session.cancel()
    quiet, other = os.pipe()  # a file that is never readable, under the socket's old number
    try:
        if quiet != number:  # (the lowest free number, which the socket's often is)
            os.dup2(quiet, number)
        pusher.join(10)
        assert not pusher.is_alive(), "the waiting thread slept on a file that is no longer its socket"
    finally:
        for fd in {number, quiet, other}:
            os.close(fd)
    assert [e.code for e in errors] == [grpc.StatusCode.CANCELLED]
    listener.close()
    serving.join(10)


@pytest.mark.parametrize("blobs", [[b"a" * 300, b"b" * 70_000], [b"c"] * 600, []], ids=["two", "many", "tmpfs"])
def test_a_push_sent_in_parts_is_the_message_with_its_data(blobs: list[bytes]) -> None:
    """The client sends an inline push's images as they are (no copy into one buffer): the server
    parses exactly the request with ``data`` set."""
    push = infer_pb2.PushDataRequest(names=["n"] * len(blobs), sizes=[len(b) for b in blobs], request_id="r")
    request = infer_pb2.SessionRequest(tag=7, defer_answer=True, push=push)
    parts = message_parts(request, blobs)
    payload = b"".join(parts[1:])
    assert HEADER.unpack(parts[0]) == (1, Kind.MESSAGE, len(payload))
    whole = infer_pb2.SessionRequest()
    whole.CopyFrom(request)
    whole.push.data = b"".join(blobs)
    assert infer_pb2.SessionRequest.FromString(payload) == whole
    assert len(parts) <= 512 + 3
