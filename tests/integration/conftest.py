"""The real server, started as ``python -m infer_server serve --port 0`` with the real worker pool.

One server per session (``server``) serves every module except those that need other limits;
they start their own with :func:`running_server`. Startup is awaited on the ``listening on`` line
and then on the health service (Watch, no polling). Teardown sends SIGTERM, expects a clean exit,
and asserts that no worker process survived and that the fresh shared directory is empty again.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engines.scenes import Scene, generate_scene
from infer_client import InferClient

STARTUP_TIMEOUT_S = 240.0  # two workers load three models each on a busy 2-core box


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    address: str
    shm_dir: Path
    log_path: Path

    def client(self, **kwargs: object) -> InferClient:
        return InferClient(self.address, shm_dir=self.shm_dir, **kwargs)  # type: ignore[arg-type]

    def worker_pids(self) -> list[int]:
        """Stage worker processes: spawned children of the server (not its resource tracker)."""
        return [pid for pid in child_pids(self.process.pid) if b"spawn_main" in _cmdline(pid)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def child_pids(parent: int) -> list[int]:
    """Direct children of ``parent``, from /proc (no psutil)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name is parenthesised and may hold spaces: fields restart after the last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def is_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"


def _exit_waiters(pids: list[int]) -> dict[int, int]:
    """A pidfd per process: readable once it exits, and immune to the pid being reused."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    return fds


def _survivors(fds: dict[int, int], timeout: float) -> list[int]:
    """Processes still running after ``timeout`` (the resource tracker exits just after its parent)."""
    deadline = time.monotonic() + timeout
    pending = dict(fds)
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(pending.values()), [], [], left)
        pending = {pid: fd for pid, fd in pending.items() if fd not in ready}
    for fd in fds.values():
        os.close(fd)
    return list(pending)


def _read_port(process: subprocess.Popen[str], timeout: float) -> int:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = process.stdout.readline()
            if not line:  # exited before serving
                break
            if line.startswith("listening on "):
                return int(line.rsplit(":", 1)[1])
    raise RuntimeError("the server did not report its port")


@contextlib.contextmanager
def running_server(models: Path, *args: str, workers: int = 2) -> Iterator[RunningServer]:
    shm_dir = Path(tempfile.mkdtemp(prefix="infer-it-", dir="/dev/shm"))
    log_path = Path(tempfile.mkstemp(prefix="infer-it-server-", suffix=".log")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
    cmd = [
        *(sys.executable, "-m", "infer_server", "serve", "--models", str(models)),
        *("--host", "127.0.0.1", "--port", "0", "--shm-dir", str(shm_dir)),
        *("--workers", str(workers), "--batch-size", "4", *args),
    ]
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    server = RunningServer(process, "", shm_dir, log_path)
    try:
        try:
            port = _read_port(process, STARTUP_TIMEOUT_S)
        except RuntimeError:
            pytest.fail(f"server did not start:\n{server.log()}")
        server.address = f"127.0.0.1:{port}"
        with server.client() as client:
            client.wait_ready(timeout=60)
        yield server
    finally:
        children = _exit_waiters(child_pids(process.pid))
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        leftovers = os.listdir(shm_dir)
        shutil.rmtree(shm_dir, ignore_errors=True)
        survivors = _survivors(children, timeout=10)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert code == 0, f"server exited with {code}:\n{server.log()}"
        assert survivors == [], "worker processes outlived the server"
        assert leftovers == [], f"shared directory not empty after the run: {leftovers}"
        log_path.unlink()


@pytest.fixture(scope="session")
def server(model_repo_dir: Path) -> Iterator[RunningServer]:
    with running_server(model_repo_dir) as srv:
        yield srv


@pytest.fixture(scope="session")
def scenes() -> list[Scene]:
    return [generate_scene(seed) for seed in range(1000, 1012)]


@pytest.fixture
def client(server: RunningServer) -> Iterator[InferClient]:
    with server.client() as c:
        yield c
