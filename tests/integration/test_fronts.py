"""Several gRPC front processes (``--fronts 2``): they share the port, a dead one is replaced
without losing what was pushed, and none outlives the main process.

The rest of the contracts (exactly once with a worker killed, idempotency, admission, the gate,
health, drain, TLS, the Open Inference Protocol) are the whole integration suite's: ``make test``
runs it a second time with ``--fronts 2``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.procs import descendants, exit_waiters, read_address, still_running
from benchmarks.servers import cmdline, free_port
from engines.scenes import Scene
from infer_client import InferClient
from tests.integration.conftest import STARTUP_TIMEOUT_S, RunningServer, bare_server, running_server


def front_pids(server_pid: int) -> list[int]:
    return [pid for pid in descendants(server_pid) if b"infer_server.relay" in cmdline(pid)]


def _kill_and_wait(pids: list[int]) -> None:
    exits = exit_waiters(pids)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert still_running(exits, timeout=10) == []  # (a connection made before they are gone is reset)


def _established(pid: int, port: int) -> int:
    """The process's TCP connections accepted on ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    table = Path("/proc/net/tcp").read_text().splitlines()[1:] + Path("/proc/net/tcp6").read_text().splitlines()[1:]
    for line in table:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def fronts_server(model_repo_dir: Path) -> Iterator[RunningServer]:
    socket_path = Path(tempfile.mkdtemp(prefix="infer-it-")) / "server.sock"
    with running_server(model_repo_dir, "--fronts", "2", "--unix-socket", str(socket_path), "--null-model",
                        "--metrics-port", str(METRICS_PORT)) as srv:  # fmt: skip
        yield srv


def test_connections_spread_over_the_front_processes(fronts_server: RunningServer) -> None:
    port = int(fronts_server.address.rsplit(":", 1)[1])
    own_connection = [("grpc.use_local_subchannel_pool", 1)]  # channels of one process share one otherwise
    channels = [grpc.insecure_channel(fronts_server.address, options=own_connection) for _ in range(16)]
    try:
        for channel in channels:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        fronts = front_pids(fronts_server.process.pid)
        assert len(fronts) == 2
        assert _established(fronts_server.process.pid, port) == 0  # the main process speaks no gRPC
        per_front = [_established(pid, port) for pid in fronts]
        assert sum(per_front) >= 16 and min(per_front) > 0, per_front  # all on one: 2 in 65536
    finally:
        for channel in channels:
            channel.close()


def test_the_unix_socket_is_served_too(fronts_server: RunningServer, scenes: list[Scene]) -> None:
    socket_path = next(str(a) for a in fronts_server.process.args if str(a).endswith("server.sock"))  # type: ignore
    with InferClient(f"unix:{socket_path}", shm_dir=fronts_server.shm_dir) as client:
        assert [r.index for r in client.detect([s.jpeg for s in scenes[:3]])] == [0, 1, 2]


def test_killed_front_processes_are_replaced_and_a_push_is_answered_once(
    fronts_server: RunningServer, scenes: list[Scene]
) -> None:
    images = [s.jpeg for s in scenes]
    with fronts_server.client() as client:
        batch_id = client.push(images, request_id="across-fronts")
    before = front_pids(fronts_server.process.pid)
    _kill_and_wait(before)  # every connection drops, as it would for a client whose front died
    with fronts_server.client() as client:  # a client reconnecting: its pushes are retried
        client.wait_ready(timeout=60)  # waits for the replacements to listen
        after = front_pids(fronts_server.process.pid)
        assert len(after) == 2 and not set(after) & set(before)
        assert client.push(images, request_id="across-fronts") == batch_id  # the same batch, not a second one
        results = list(client.pull(batch_id, timeout=60))
    assert sorted(r.index for r in results) == list(range(len(images)))
    assert all(r.ok for r in results)
    assert "exited with -9: starting it again" in fronts_server.log_path.read_text()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10).read().decode()
    assert float(re.search(r"^infer_front_process_exits_total (\S+)$", metrics, re.M)[1]) >= 2  # type: ignore[index]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to try the port as another user")
def test_no_other_user_can_take_the_port_while_the_front_processes_start_again(fronts_server: RunningServer) -> None:
    port = int(fronts_server.address.rsplit(":", 1)[1])
    _kill_and_wait(front_pids(fronts_server.process.pid))
    squat = (
        "import os, socket\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('bound')\n"
    )
    taken = subprocess.run([sys.executable, "-c", squat], capture_output=True, text=True, timeout=30)
    assert "bound" not in taken.stdout and "Address already in use" in taken.stderr, taken.stderr
    with fronts_server.client() as client:
        client.wait_ready(timeout=60)


def test_a_stop_signal_to_the_whole_process_group_leaves_the_drain_to_the_main_process(
    fronts_server: RunningServer,
) -> None:
    """systemd stops a service by signalling its whole group: the front processes must go on
    serving while the main process drains, and stop when it tells them."""
    fronts = front_pids(fronts_server.process.pid)
    for pid in fronts:
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGINT)
    assert sorted(still_running(exit_waiters(fronts), timeout=1.0)) == sorted(fronts)
    with fronts_server.client() as client:
        assert client.health()


def test_front_processes_exit_with_the_main_process(model_repo_dir: Path, tmp_path: Path) -> None:
    with bare_server(model_repo_dir, tmp_path / "server.log", "--workers", "1", "--fronts", "2") as process:
        read_address(process, STARTUP_TIMEOUT_S)
        children = descendants(process.pid)
        assert len(front_pids(process.pid)) == 2
        waiters = exit_waiters(children)
        process.kill()  # no drain, no goodbye: the front processes see their link close
        process.wait()
        assert still_running(waiters, timeout=20) == []
