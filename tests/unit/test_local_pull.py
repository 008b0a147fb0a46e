"""Pulls on the local sockets of a server of several shards (``infer_client.local_pull``), against
scripted shards: each a real Unix socket whose server thread speaks the frames a shard would."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from infer_client import InferError
from infer_client.local_pull import pull_shards, pull_shards_async, push_on_shard
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, encode_end, frame

B0, B1 = "0" + "a" * 31, "1" + "b" * 31  # a batch of shard 0, one of shard 1


def _result(batch_id: str, index: int) -> bytes:
    return frame(1, Kind.MESSAGE, infer_pb2.ImageResult(batch_id=batch_id, index=index).SerializeToString())


def _end(code: grpc.StatusCode = grpc.StatusCode.OK, details: str = "") -> bytes:
    return frame(1, Kind.END, encode_end(code.value[0], details))


def _read_frame(conn: socket.socket) -> tuple[int, bytes]:
    header = conn.recv(HEADER.size, socket.MSG_WAITALL)
    _, kind, length = HEADER.unpack(header)
    return kind, conn.recv(length, socket.MSG_WAITALL) if length else b""


class Shard:
    """One scripted shard: it takes the call's start, asks for the request, checks it names
    ``expect``, then sends ``replies`` as they are (each ``sendall`` as given, so a frame may come
    in pieces)."""

    def __init__(self, path: Path, expect: list[str], replies: list[bytes], hang_up: bool = False) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.expect, self.replies, self.hang_up = expect, replies, hang_up
        self.requested: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            assert _read_frame(conn)[0] == Kind.START
            conn.sendall(frame(1, Kind.WANT, b"1"))
            kind, payload = _read_frame(conn)
            assert kind == Kind.MESSAGE
            self.requested = list(infer_pb2.PullResultRequest.FromString(payload).batch_ids)
            assert _read_frame(conn)[0] == Kind.HALF_CLOSE
            for part in self.replies:
                conn.sendall(part)
            if not self.hang_up:
                conn.recv(1)  # until the client closes

    def close(self) -> None:
        self.thread.join(10)
        self.listener.close()
        assert self.requested == self.expect


@pytest.fixture
def shards(tmp_path: Path) -> Iterator[Callable[..., str]]:
    made: list[Shard] = []

    def make(zero: list[bytes], one: list[bytes], hang_up: bool = False) -> str:
        """Shards 0 and 1; with ``hang_up``, shard 1 closes the connection after its replies."""
        path = tmp_path / "local.sock"
        made.extend([Shard(path, [B0], zero), Shard(Path(f"{path}.1"), [B1], one, hang_up)])
        return str(path)

    yield make
    for shard in made:
        shard.close()


def _pull_all(path: str, asynchronous: bool) -> tuple[list[tuple[str, int]], InferError | None]:
    got: list[tuple[str, int]] = []
    if not asynchronous:
        try:
            got.extend((r.batch_id, r.index) for r in pull_shards(path, [B0, B1], (2, os.geteuid()), None, 10))
        except InferError as exc:
            return got, exc
        return got, None

    async def run() -> InferError | None:
        try:
            async for r in pull_shards_async(path, [B0, B1], (2, os.geteuid()), None, 10):
                got.append((r.batch_id, r.index))
        except InferError as exc:
            return exc
        return None

    return got, asyncio.run(run())


@pytest.mark.parametrize("asynchronous", [False, True])
def test_each_batch_is_pulled_on_its_shard_and_frames_may_come_in_pieces(shards, asynchronous: bool) -> None:  # type: ignore[no-untyped-def]
    whole = _result(B0, 0) + _result(B0, 1) + _end()
    path = shards([whole[:3], whole[3:11], whole[11:]], [_result(B1, 0), _end()])
    got, error = _pull_all(path, asynchronous)
    assert error is None and sorted(got) == [(B0, 0), (B0, 1), (B1, 0)]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_shard_that_ends_in_error_loses_nothing_received(shards, asynchronous: bool) -> None:  # type: ignore[no-untyped-def]
    """The server counts a result delivered once its socket took it: results that came before
    an error END, on that shard and on the others, must reach the caller before the error."""
    path = shards(
        [_result(B0, 0) + _result(B0, 1) + _end()],
        [_result(B1, 0) + _end(grpc.StatusCode.NOT_FOUND, "unknown or expired batch id")],
    )
    got, error = _pull_all(path, asynchronous)
    assert sorted(got) == [(B0, 0), (B0, 1), (B1, 0)]
    assert error is not None and error.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_shard_that_goes_away_is_unavailable(shards, asynchronous: bool) -> None:  # type: ignore[no-untyped-def]
    path = shards([_result(B0, 0) + _end()], [_result(B1, 0)], hang_up=True)  # no END from shard 1
    got, error = _pull_all(path, asynchronous)
    assert sorted(got) == [(B0, 0), (B1, 0)]
    assert error is not None and error.code == grpc.StatusCode.UNAVAILABLE


def test_no_end_within_the_timeout_is_deadline_exceeded(tmp_path: Path) -> None:
    path = tmp_path / "local.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()  # accepted by the kernel, never answered
        with pytest.raises(InferError) as expired:
            list(pull_shards(str(path), [B0], (2, os.geteuid()), None, 0.2))
        assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_push_whose_answer_trickles_past_its_timeout_is_deadline_exceeded(tmp_path: Path) -> None:
    """The timeout bounds the whole push, as gRPC's deadline does, not each receive: a shard that
    keeps sending frames that are no answer (a WANT every 50 ms) does not hold the caller past it."""
    path, stop = tmp_path / "local.sock", threading.Event()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen()

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn:
                for _ in range(100):  # 5 s, then it hangs up (UNAVAILABLE, where the timeout is not kept)
                    if stop.wait(0.05):  # the scripted shard's pace
                        return
                    conn.sendall(frame(1, Kind.WANT, b"1"))

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        request = infer_pb2.PushDataRequest(request_id="r", data=b"x", sizes=[1])
        try:
            with pytest.raises(InferError) as expired:
                push_on_shard(str(path), request, (1, os.geteuid()), None, 0.3)
        finally:
            stop.set()
            thread.join(10)
    assert expired.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
