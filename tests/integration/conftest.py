"""The real server, started as ``python -m infer_server serve --port 0`` with the real worker pool.

One server per session (``server``) serves every module except those that need other limits;
they start their own with :func:`running_server`. Startup is awaited on the ``listening on`` line
and then on the health service (Watch, no polling). Teardown sends SIGTERM, expects a clean exit,
and asserts that no worker process survived and that the fresh shared directory is empty again.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks.procs import descendants, exit_waiters, read_address, still_running
from benchmarks.servers import cmdline
from engines.scenes import Scene, generate_scene
from infer_client import Credentials, InferClient

STARTUP_TIMEOUT_S = 240.0  # two workers load three models each on a busy 2-core box


def pytest_configure(config: pytest.Config) -> None:
    global FRONTS, LOCAL, SHARDS
    FRONTS = config.getoption("--fronts", 0) or 0
    LOCAL = bool(config.getoption("--local-socket", False))
    SHARDS = config.getoption("--shards", 1) or 1


FRONTS = 0  # every server the tests start: gRPC in the main process, or in this many front processes
LOCAL = False  # every server the tests start has a local socket, and the fixture's clients use it
SHARDS = 1  # with LOCAL: every server the tests start has this many shards


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    address: str
    shm_dir: Path
    log_path: Path
    credentials: Credentials | None = None  # what the fixture's own client uses (health needs none)
    local_socket: Path | None = None  # its --local-socket (pytest --local-socket)

    def client(self, **kwargs: object) -> InferClient:
        kwargs.setdefault("credentials", self.credentials)
        kwargs.setdefault("local_socket", self.local_socket)
        return InferClient(self.address, shm_dir=self.shm_dir, **kwargs)  # type: ignore[arg-type]

    def worker_pids(self) -> list[int]:
        """Stage worker processes: spawned children of the server (not its resource tracker)."""
        return [pid for pid in descendants(self.process.pid) if b"spawn_main" in cmdline(pid)]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextlib.contextmanager
def running_server(
    models: Path, *args: str, workers: int = 2, credentials: Credentials | None = None
) -> Iterator[RunningServer]:
    shm_dir = Path(tempfile.mkdtemp(prefix="infer-it-", dir="/dev/shm"))
    log_path = Path(tempfile.mkstemp(prefix="infer-it-server-", suffix=".log")[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
    cmd = [
        *(sys.executable, "-m", "infer_server", "serve", "--models", str(models)),
        *("--host", "127.0.0.1", "--port", "0", "--shm-dir", str(shm_dir)),
        *("--workers", str(workers), "--batch-size", "4", *args),
    ]
    if FRONTS and "--fronts" not in args:
        cmd += ["--fronts", str(FRONTS)]
    # Not where client certificates name the callers and there are no tokens: nobody could call there.
    certificates_only = "--tls-client-ca" in args and "--tokens-file" not in args
    wants_local = LOCAL and "--local-socket" not in args and not certificates_only
    local_socket = Path(f"{log_path}.sock") if wants_local else None
    if local_socket is not None:
        cmd += ["--local-socket", str(local_socket)]
        if SHARDS > 1 and "--shards" not in args and workers >= SHARDS:
            cmd += ["--shards", str(SHARDS)]
    with log_path.open("w") as log:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    server = RunningServer(process, "", shm_dir, log_path, credentials, local_socket)
    try:
        try:
            port = int(read_address(process, STARTUP_TIMEOUT_S).rsplit(":", 1)[1])
        except RuntimeError:
            pytest.fail(f"server did not start:\n{server.log()}")
        server.address = f"127.0.0.1:{port}"
        with server.client() as client:
            client.wait_ready(timeout=60)
        yield server
    finally:
        children = exit_waiters(descendants(process.pid))
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        leftovers = os.listdir(shm_dir)
        shutil.rmtree(shm_dir, ignore_errors=True)
        survivors = still_running(children, timeout=10)
        for pid in survivors:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert code == 0, f"server exited with {code}:\n{server.log()}"
        assert survivors == [], "worker processes outlived the server"
        assert leftovers == [], f"shared directory not empty after the run: {leftovers}"
        assert local_socket is None or not local_socket.exists(), "the local socket outlived the server"
        log_path.unlink()


@contextlib.contextmanager
def bare_server(models: Path, log: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """``serve`` with the null model on a fresh shared directory, without the fixture's waits and
    checks: for tests that kill the server, or make it fail, on purpose. Its log goes to ``log``."""
    shm_dir = Path(tempfile.mkdtemp(prefix="infer-it-", dir="/dev/shm"))
    cmd = [sys.executable, "-m", "infer_server", "serve", "--models", str(models), "--null-model",
           "--host", "127.0.0.1", "--port", "0", "--shm-dir", str(shm_dir), *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
    with log.open("w") as out:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=out, text=True, env=env)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(shm_dir, ignore_errors=True)


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
