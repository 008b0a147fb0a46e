"""The client's routing among shards (``infer_client.routed``) against a scripted shard 0 and a
shard 1 socket that another user bound: a routed session must not talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from infer_client import InferError
from infer_client._protocol import BatchFiles, PushedBatches
from infer_client.local_pull import pull_shards, pull_shards_async
from infer_client.routed import AsyncRoutedSession, RoutedSession, local_session
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, frame

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to bind a socket as another user")

_IMPOSTOR = """
import os, socket, sys
os.setgid(65534); os.setuid(65534)
listener = socket.socket(socket.AF_UNIX)
listener.bind(sys.argv[1]); listener.listen()
print("bound", flush=True)
conn, _ = listener.accept()
received = b""
while chunk := conn.recv(65536):
    received += chunk
print(len(received), flush=True)
"""


def _shard_zero(path: str) -> threading.Thread:
    """Shard 0 of two, for one session: it says so (suggesting shard 1) and grants a window."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            header = conn.recv(HEADER.size, socket.MSG_WAITALL)
            conn.recv(HEADER.unpack(header)[2], socket.MSG_WAITALL)  # the call's start
            shards = infer_pb2.Shards(count=2, index=0, suggested=1)
            conn.sendall(frame(1, Kind.MESSAGE, infer_pb2.SessionReply(shards=shards).SerializeToString()))
            conn.sendall(frame(1, Kind.WANT, b"1048576"))
            with contextlib.suppress(OSError):  # the session may reset the connection as it breaks
                while conn.recv(65536):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def folder() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="infer-routed-", dir="/tmp"))
    path.chmod(0o777)  # the other user binds its socket here
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=False)


def _impostor(path: str) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", _IMPOSTOR, path], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "bound"
    return process


def _told_nothing(impostor: subprocess.Popen[str]) -> None:
    out, _ = impostor.communicate(timeout=30)
    assert out.strip() == "0", "the session sent the other user something (its start, its token)"


def test_a_shard_socket_served_by_another_user_is_refused(folder: Path) -> None:
    path = str(folder / "local.sock")
    zero, impostor = _shard_zero(path), _impostor(f"{path}.1")
    pushed = PushedBatches(BatchFiles(str(folder)))
    session = local_session(path, "inline", pushed, 10.0, [("authorization", "Bearer secret")])
    assert isinstance(session, RoutedSession) and session.home == 1
    with pytest.raises(InferError) as refused:
        session.push([b"\xff\xd8 not really a jpeg"])
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "served by uid 65534" in refused.value.message
    assert session.broken  # a new session asks shard 0 again
    session.cancel()
    _told_nothing(impostor)
    zero.join(10)


def test_the_asyncio_session_refuses_it_too(folder: Path) -> None:
    path = str(folder / "local.sock")
    zero, impostor = _shard_zero(path), _impostor(f"{path}.1")

    async def push() -> InferError:
        session = AsyncRoutedSession(path, "inline", PushedBatches(BatchFiles(str(folder))), 10.0, None)
        try:
            await session.push([b"\xff\xd8 not really a jpeg"])
        except InferError as exc:
            assert session.broken
            return exc
        finally:
            await session.close(timeout=0)
        raise AssertionError("pushed to another user's socket")

    refused = asyncio.run(push())
    assert refused.code == grpc.StatusCode.UNAVAILABLE and "served by uid 65534" in refused.message
    _told_nothing(impostor)
    zero.join(10)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_pull_does_not_ask_another_users_shard_socket(folder: Path, asynchronous: bool) -> None:
    """A pull of shard 1's batch (its id's first digit) must not send its start (the token, the
    batch ids) to a socket another user bound at ``PATH.1``."""
    path = str(folder / "local.sock")
    impostor, token = _impostor(f"{path}.1"), [("authorization", "Bearer secret")]
    batch_id = "1" + "0" * 31

    async def pull_on_the_loop() -> None:
        async for _ in pull_shards_async(path, [batch_id], (2, os.geteuid()), token, 10):
            pass

    with pytest.raises(InferError) as refused:
        if asynchronous:
            asyncio.run(pull_on_the_loop())
        else:
            list(pull_shards(path, [batch_id], (2, os.geteuid()), token, 10))
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "served by uid 65534" in refused.value.message
    _told_nothing(impostor)
