"""The main process's relay of gRPC calls to a shard (``front.shard_relay``), both ends on one loop:
``ToShard`` on one end of a socket pair, ``FromMain`` serving real method handlers on the other.
Only the process boundary is missing (``tests/integration/test_shards.py`` has it)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import pytest

from infer_proto import infer_pb2
from infer_server.front.relayed import Handlers
from infer_server.front.shard_relay import FromMain, Relayed, ToShard
from infer_server.front.spread_session import answers_and_completions

T = TypeVar("T")
_METHOD = "/test.Numbers/Count"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 20))


class Caller:
    """What ``ToShard.call`` reads of the main process's call (a grpc.aio servicer context)."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer t"),)

    def peer(self) -> str:
        return "ipv4:10.0.0.7:5000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [b"alice"]}


class Shard:
    """A shard's end: one unary-stream method that answers ``count`` numbers, each once its write
    was acknowledged, and records what it saw of the call (and whether it was cancelled)."""

    def __init__(self, gate: Awaitable[None] | None = None) -> None:
        self.seen: dict[str, Any] = {}
        self.acknowledged: list[int] = []
        self.cancelled = asyncio.Event()
        self._gate = gate

    def handlers(self) -> Handlers:
        handlers = Handlers()
        method = grpc.unary_stream_rpc_method_handler(self._count, bytes, lambda n: str(n).encode())
        handlers.add_registered_method_handlers("test.Numbers", {"Count": method})
        return handlers

    async def _count(self, request: bytes, context: Any) -> None:
        self.seen = {"request": request, "metadata": context.invocation_metadata(), "peer": context.peer(),
                     "auth": context.auth_context()}  # fmt: skip
        try:
            if request == b"fail":
                await context.abort(grpc.StatusCode.NOT_FOUND, "no such numbers")
            for n in range(int(request)):
                await context.write(n)
                self.acknowledged.append(n)
                if self._gate is not None:
                    await self._gate
        except asyncio.CancelledError:
            self.cancelled.set()
            raise


async def _linked(shard: Shard) -> tuple[ToShard, FromMain]:
    ours, theirs = socket.socketpair()
    to_shard, from_main = ToShard(1), FromMain(theirs, shard.handlers(), (), 8)
    await from_main.start()
    await to_shard.connect(ours)
    return to_shard, from_main


def _collect(into: list[bytes]) -> Callable[[bytes], Awaitable[None]]:
    async def write(payload: bytes) -> None:
        into.append(payload)

    return write


def test_a_relayed_call_carries_its_callers_metadata_peer_and_credentials_and_its_responses_come_back() -> None:
    async def scenario() -> tuple[list[bytes], Shard]:
        shard, got = Shard(), []
        to_shard, from_main = await _linked(shard)
        await to_shard.call(_METHOD, Caller(), b"3", _collect(got))
        await from_main.stop(1)
        return got, shard

    got, shard = run(scenario())
    assert got == [b"0", b"1", b"2"] and shard.acknowledged == [0, 1, 2]
    assert shard.seen == {"request": b"3", "metadata": (("authorization", "Bearer t"),), "peer": "ipv4:10.0.0.7:5000",
                          "auth": {"x509_common_name": [b"alice"]}}  # fmt: skip


def test_an_error_on_the_shard_is_the_calls_status() -> None:
    async def scenario() -> Relayed:
        to_shard, from_main = await _linked(Shard())
        with pytest.raises(Relayed) as ended:
            await to_shard.call(_METHOD, Caller(), b"fail", _collect([]))
        await from_main.stop(1)
        return ended.value

    error = run(scenario())
    assert (error.code, error.message) == (grpc.StatusCode.NOT_FOUND, "no such numbers")


def test_a_response_the_client_did_not_take_is_not_acknowledged_and_the_shards_handler_is_cancelled() -> None:
    """A result counts as delivered on the shard only once the main process wrote it to its
    client: a write that fails there (the client went away) cancels the shard's call, and that
    response is never acknowledged (the shard's registry keeps the result for a later pull)."""

    async def scenario() -> Shard:
        shard = Shard()
        to_shard, from_main = await _linked(shard)

        async def client_gone(payload: bytes) -> None:
            if payload == b"1":
                raise ConnectionError("the client went away")

        with pytest.raises(ConnectionError):
            await to_shard.call(_METHOD, Caller(), b"5", client_gone)
        await asyncio.wait_for(shard.cancelled.wait(), 5)
        await from_main.stop(1)
        return shard

    assert run(scenario()).acknowledged == [0]


def test_a_shard_that_exits_ends_its_calls_unavailable() -> None:
    async def scenario() -> Relayed:
        hold: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        to_shard, from_main = await _linked(Shard(gate=hold))
        first = asyncio.Event()

        async def write(payload: bytes) -> None:
            first.set()

        call = asyncio.ensure_future(to_shard.call(_METHOD, Caller(), b"5", write))
        await first.wait()
        from_main._calls.link.close()  # the shard's process is gone: its end of the socket closes
        with pytest.raises(Relayed) as ended:
            await call
        hold.cancel()
        await from_main.stop(0)
        with pytest.raises(Relayed) as refused:  # and a call after that is refused at once
            await to_shard.call(_METHOD, Caller(), b"1", _collect([]))
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE
        return ended.value

    assert run(scenario()).code == grpc.StatusCode.UNAVAILABLE


def test_a_forwarded_reply_is_read_for_its_answers_and_completions_only() -> None:
    """What the main process counts of a sub-session's reply it forwards (``spread_session``):
    the answers and completed ids, its results skipped unread, in a reply as protobuf writes it."""
    results = [infer_pb2.ImageResult(batch_id="b1", index=i, name="x" * 300) for i in range(3)]
    answers = [infer_pb2.PushAnswer(tag=7, batch_id="b1", image_count=3),
               infer_pb2.PushAnswer(tag=8, status=infer_pb2.Status(code=3, message="no"))]  # fmt: skip
    reply = infer_pb2.SessionReply(answers=answers, results=results, completed=["b0", "b1"]).SerializeToString()
    got, completed = answers_and_completions(reply)
    assert got == answers and completed == ["b0", "b1"]
    assert answers_and_completions(b"") == ([], [])
