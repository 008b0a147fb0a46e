"""The local socket (``--local-socket``) on a real server: sessions without gRPC.

Every other integration test runs once more with its sessions on the local socket (``make test``:
``pytest -m integration --local-socket``); these are about the socket itself: who may connect,
who the server says is calling, a client next to a gRPC client on the same batches, and what a
client sees when the server goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_client import AsyncInferClient, InferError, LocalSession
from tests.integration.conftest import RunningServer, running_server


@pytest.fixture(scope="module")
def local_server(model_repo_dir: Path) -> Iterator[RunningServer]:
    folder = Path(tempfile.mkdtemp(prefix="infer-local-"))
    path = folder / "local.sock"
    with running_server(model_repo_dir, "--null-model", "--local-socket", str(path), workers=1) as srv:
        srv.local_socket = path
        yield srv
    folder.rmdir()


def test_sessions_and_grpc_calls_share_the_batches(local_server: RunningServer, scenes: list[Scene]) -> None:
    images = [s.jpeg for s in scenes[:3]]
    with local_server.client() as client, client.session() as session:
        assert isinstance(session, LocalSession)
        batch_id = session.push(images, request_id="local-then-grpc")
        assert {r.index for r in session.results(batch_id)} == {0, 1, 2}
        # The same request_id through gRPC is the same batch (its results were delivered already).
        assert client.push(images, request_id="local-then-grpc") == batch_id
        assert [r.ok for r in client.detect(images[:1])] == [True]


def _voluntary_switches() -> int:
    """How often the calling thread gave up its CPU to wait (the kernel's count)."""
    status = Path(f"/proc/self/task/{threading.get_native_id()}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("voluntary_ctxt_switches")))


def test_a_push_wakes_its_waiting_thread_once(local_server: RunningServer, scenes: list[Scene]) -> None:
    """A thread blocked in ``recv`` on a Unix socket is woken whenever the other end reads what it
    sent (buffer space wakes readers and writers alike): the server's read of each push woke the
    client for nothing, two waits per push instead of one."""
    images = [s.jpeg for s in scenes[:1]]
    with local_server.client() as client, client.session() as session:
        for _ in range(20):  # the connection and the server's caches warm
            session.detect(images)
        pushes, before = 200, _voluntary_switches()
        for _ in range(pushes):
            assert [r.ok for r in session.detect(images)] == [True]
        per_push = (_voluntary_switches() - before) / pushes
    assert per_push < 1.5, f"{per_push:.2f} waits per push"


def test_the_server_names_the_caller_by_the_kernels_word(local_server: RunningServer, scenes: list[Scene]) -> None:
    with local_server.client() as client:
        client.detect([scenes[0].jpeg])
    assert f'"peer":"local:pid={os.getpid()},uid={os.geteuid()}"' in local_server.log_path.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to connect as another user")
def test_no_other_user_may_connect(local_server: RunningServer) -> None:
    attempt = (
        "import os, socket\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"socket.socket(socket.AF_UNIX).connect({str(local_server.local_socket)!r}); print('connected')\n"
    )
    tried = subprocess.run([sys.executable, "-c", attempt], capture_output=True, text=True, timeout=30)
    assert "connected" not in tried.stdout and "PermissionError" in tried.stderr, tried.stderr


def test_a_client_sees_unavailable_when_the_server_is_gone(model_repo_dir: Path, scenes: list[Scene]) -> None:
    folder = Path(tempfile.mkdtemp(prefix="infer-local-"))
    path = folder / "local.sock"
    with running_server(model_repo_dir, "--null-model", "--local-socket", str(path), workers=1) as srv:
        srv.local_socket = path
        client = srv.client(timeout=30, transport="inline")  # no file of its own left in the shared directory
        session = client.session()
        assert [r.ok for r in session.detect([scenes[0].jpeg])] == [True]
    assert not path.exists()  # the server removed its socket as it stopped
    with pytest.raises(InferError) as ended:
        session.detect([scenes[1].jpeg])
    assert ended.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    with pytest.raises(InferError) as refused:
        client.session()
    assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    client.close()
    folder.rmdir()



@pytest.mark.parametrize("command", ["detect", "batch"])
def test_the_command_line_client_pushes_on_the_local_socket(local_server: RunningServer, scenes: list[Scene],
                                                            tmp_path: Path, command: str) -> None:  # fmt: skip
    image = tmp_path / "in" / "scene.jpg"
    image.parent.mkdir()
    image.write_bytes(scenes[0].jpeg)
    out_file = tmp_path / "results.jsonl"
    what = [str(image), "--json"] if command == "detect" else [str(image.parent), "--out", str(out_file)]
    cli = subprocess.Popen(
        [str(Path(sys.executable).with_name("infer-client")), command, *what,
         "--server", local_server.address, "--shm-dir", str(local_server.shm_dir),
         "--local-socket", str(local_server.local_socket)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, err
    assert json.loads(out if command == "detect" else out_file.read_text())["status"]["name"] == "OK"
    assert f'"peer":"local:pid={cli.pid},' in local_server.log_path.read_text()  # it came by the local socket


def test_an_asyncio_client_runs_its_sessions_on_the_local_socket(local_server: RunningServer,
                                                                 scenes: list[Scene]) -> None:  # fmt: skip
    async def main() -> tuple[list[bool], set[int], InferError]:
        async with AsyncInferClient(local_server.address, shm_dir=local_server.shm_dir,
                                    local_socket=local_server.local_socket) as client:  # fmt: skip
            detected = [r.ok for r in await client.detect([s.jpeg for s in scenes[:2]])]
            session = client.session()
            ids = await asyncio.gather(*(session.push([s.jpeg]) for s in scenes[2:5]))
            indexes = {r.index for batch_id in ids async for r in session.results(batch_id)}
            await session.close()
            with pytest.raises(InferError) as closed:
                await session.push([scenes[5].jpeg])
            return detected, indexes, closed.value

    ours = f'"peer":"local:pid={os.getpid()},'
    before = local_server.log_path.read_text().count(ours)
    detected, indexes, closed = asyncio.run(asyncio.wait_for(main(), 60))
    assert detected == [True, True] and indexes == {0}
    assert closed.code == grpc.StatusCode.CANCELLED
    assert local_server.log_path.read_text().count(ours) == before + 4  # every push came by the local socket
