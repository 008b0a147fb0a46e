"""``--event-loop``: the main process, its shards and its gRPC front processes run on uvloop unless
``--event-loop asyncio`` asks for asyncio's own loop; either way the server serves the same."""

from __future__ import annotations

import tempfile
from pathlib import Path

import grpc
import pytest

from benchmarks.procs import descendants
from benchmarks.servers import cmdline
from engines.scenes import generate_scene
from tests.integration.conftest import RunningServer, running_server


def _maps_uvloop(pid: int) -> bool:
    """Whether the process has uvloop's extension loaded (a server on asyncio's loop never imports it)."""
    return "/uvloop/loop." in Path(f"/proc/{pid}/maps").read_text()


def _loop_processes(server: RunningServer) -> dict[str, list[int]]:
    """The server's processes that run an event loop: itself, its shards, its gRPC front processes."""
    children = descendants(server.process.pid)
    return {
        "main": [server.process.pid],
        "shards": [pid for pid in children if b"infer_server.front.shards" in cmdline(pid)],
        "fronts": [pid for pid in children if b"infer_server.relay" in cmdline(pid)],
    }


def _serves(server: RunningServer, local_socket: Path) -> None:
    """A push over gRPC, and pushes over the local socket (on every shard), all answered."""
    jpegs = [generate_scene(seed).jpeg for seed in (51, 52)]
    with server.client(local_socket=None) as client:
        assert [r.code for r in client.detect(jpegs)] == [grpc.StatusCode.OK] * 2
    with server.client(local_socket=local_socket) as client:
        for _ in range(4):  # the client library spreads its sessions over the shards
            assert [r.code for r in client.detect(jpegs)] == [grpc.StatusCode.OK] * 2


@pytest.mark.parametrize("kind", ["uvloop", "asyncio"])
def test_every_loop_of_the_server_is_the_one_asked_for(model_repo_dir: Path, kind: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        local_socket = Path(tmp) / "local.sock"
        args = ["--null-model", "--fronts", "1", "--local-socket", str(local_socket), "--shards", "2"]
        if kind == "asyncio":
            args += ["--event-loop", "asyncio"]
        with running_server(model_repo_dir, *args) as server:
            processes = _loop_processes(server)
            assert len(processes["shards"]) == 1 and len(processes["fronts"]) == 1, processes
            _serves(server, local_socket)
            for role, pids in processes.items():
                for pid in pids:
                    assert _maps_uvloop(pid) == (kind == "uvloop"), f"{role} {pid}"
            assert server.log_path.read_text().count(f"event loop: {kind}") == 2  # the main process and shard 1
