"""Servers under test, run as subprocesses: start, wait until ready, account CPU and memory, stop.

Runs in the benchmark's process. The product (``python -m infer_server serve``) and the REST
baseline (``python -m benchmarks.baselines.rest_server``) both print ``listening on HOST:PORT`` once
every worker loaded its models, so one launcher serves both: a fresh shared directory under
``/dev/shm`` per server, ``--port 0``, stderr to a log file that is shown if the start fails.

Accounting reads ``/proc`` only (no psutil): the server is its main process (the gRPC front, or the
HTTP front of the baseline) plus every descendant (the stage workers). ``cpu()`` splits CPU seconds
into front and workers; :class:`MemoryMonitor` samples the sum of RSS over the whole tree a few
times a second and remembers each process's ``VmHWM`` (its own peak), whose sum is an upper bound
of the tree's peak that no sampling gap can miss. Both are reported; targets use the upper bound.

Stop: SIGTERM (the server drains and stops its workers) → wait → SIGKILL if it hangs; descendants
that outlive it are killed by pid and reported, and the shared directory is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import descendants, exit_waiters, read_address, stat_fields, still_running

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 240.0  # two workers loading four to six models on a busy 2-core box


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0 once it is gone)."""
    fields = stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent busy so far (user, nice, system, irq, softirq, steal)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def runnable_wait_seconds(pid: int) -> float:
    """Seconds the threads of process ``pid`` have spent ready to run but waiting for a CPU so far
    (the kernel's ``schedstat``, summed over the threads alive now; 0 once it is gone)."""
    total = 0
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, IndexError, ValueError):  # a thread that ended meanwhile
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
    return total / 1e9


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM, ...); 0 once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages split between the processes that map them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemoryMonitor(threading.Thread):
    """Samples the summed RSS of a process tree until stopped; keeps each process's VmHWM."""

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        super().__init__(name="memory-monitor", daemon=True)
        self.root, self.interval_s = root, interval_s
        self.peak_rss = 0
        self.hwm: dict[int, int] = {}  # pid -> VmHWM in bytes, the last value read
        self._stop_event = threading.Event()

    def sample(self) -> None:
        pids = [self.root, *descendants(self.root)]
        self.peak_rss = max(self.peak_rss, sum(rss_bytes(p) for p in pids))
        for pid in pids:
            self.hwm[pid] = max(self.hwm.get(pid, 0), status_kib(pid, "VmHWM") * 1024)

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join(5.0)


@dataclass
class ServerProcess:
    """One running server under test and what is known about its processes."""

    kind: str  # "grpc" or "rest"
    process: subprocess.Popen[str]
    log_path: Path
    shm_dir: Path | None
    address: str = ""
    monitor: MemoryMonitor | None = None
    worker_pids: list[int] = field(default_factory=list)
    local_socket: Path | None = None  # the product's --local-socket, in a directory of its own

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far of the front (main process and its gRPC front processes, if any) and
        of the other descendants (workers)."""
        main, fronts, workers = self.cpu_by_role()
        return main + fronts, workers

    def cpu_by_role(self) -> tuple[float, float, float]:
        """CPU seconds so far of the main process with its shards (``--shards``: main processes of
        their own), of its gRPC front processes (``--fronts``) and of the stage workers (every other
        descendant)."""
        main, fronts, workers = cpu_seconds(self.process.pid), 0.0, 0.0
        for pid in descendants(self.process.pid):
            command = cmdline(pid)
            if b"infer_server.relay" in command:
                fronts += cpu_seconds(pid)
            elif b"infer_server.front.shards" in command:
                main += cpu_seconds(pid)
            else:
                workers += cpu_seconds(pid)
        return main, fronts, workers

    def memory(self) -> dict[str, float]:
        """Peak of the sampled RSS sum, sum of per-process peaks (upper bound), PSS sum now; in MiB."""
        assert self.monitor is not None
        self.monitor.sample()
        pids = [self.process.pid, *descendants(self.process.pid)]
        return {
            "peak_rss_mb": round(self.monitor.peak_rss / MiB, 1),
            "hwm_sum_mb": round(sum(self.monitor.hwm.values()) / MiB, 1),
            "pss_now_mb": round(sum(pss_bytes(p) for p in pids) / MiB, 1),
            "processes": len(pids),
        }

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@contextlib.contextmanager
def launched(kind: str, args: Sequence[str], *, shm: bool, label: str, wrapper: Sequence[str] = (),
             local_socket: bool = False) -> Iterator[ServerProcess]:  # fmt: skip
    """Run ``python -m <args>`` (behind ``wrapper``, e.g. ``taskset -c 0``, which must exec it) until it
    prints its address; stop it and clean up on exit. ``local_socket``: the product's
    ``--local-socket``, in a fresh directory."""
    shm_dir = Path(tempfile.mkdtemp(prefix="infer-bench-", dir="/dev/shm")) if shm else None
    fd, log_name = tempfile.mkstemp(prefix=f"infer-bench-{label}-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)
    sock = Path(tempfile.mkdtemp(prefix="infer-bench-sock-")) / "local.sock" if local_socket else None
    if sock is not None:
        args = [*args, "--local-socket", str(sock)]
    cmd = [*wrapper, sys.executable, "-m", *args, *(("--shm-dir", str(shm_dir)) if shm_dir else ())]
    # The server reads INFER_* from the environment: only what the command line says may count.
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log_path.open("w") as log_file:
        process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True, env=env, cwd=REPO_ROOT)
    server = ServerProcess(kind, process, log_path, shm_dir, local_socket=sock)
    try:
        try:
            host_port = read_address(process, STARTUP_TIMEOUT_S)
        except RuntimeError:
            raise RuntimeError(f"{label} server did not start:\n{server.log_tail()}") from None
        host, port = host_port.rsplit(":", 1)
        server.address = f"{host}:{port}"
        server.worker_pids = descendants(process.pid)
        server.monitor = MemoryMonitor(process.pid)
        server.monitor.sample()
        server.monitor.start()
        yield server
    finally:
        _stop(server)


def _stop(server: ServerProcess) -> None:
    process = server.process
    children = exit_waiters(descendants(process.pid))
    if server.monitor is not None:
        server.monitor.stop()
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        log.warning("server did not stop within 60 s; killing it")
        process.kill()
        code = process.wait()
    survivors = still_running(children, timeout=10.0)
    for pid in survivors:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if survivors:
        log.warning("%d worker processes outlived the server and were killed", len(survivors))
    if code not in (0, -signal.SIGTERM):
        log.warning("server exited with %s; log tail:\n%s", code, server.log_tail())
    if server.shm_dir is not None:
        leftovers = os.listdir(server.shm_dir)
        if leftovers:
            log.warning("shared directory not empty after the run: %d entries", len(leftovers))
        shutil.rmtree(server.shm_dir, ignore_errors=True)
    if process.stdout is not None:
        process.stdout.close()
    server.log_path.unlink(missing_ok=True)
    if server.local_socket is not None:
        shutil.rmtree(server.local_socket.parent, ignore_errors=True)


# Arguments every product server of this run gets besides its own (``fps --tokens`` adds its tokens file).
GRPC_SERVER_ARGS: list[str] = []


def grpc_server(
    models: Path, *, workers: int, batch_size: int, null_model: bool = False, label: str = "grpc",
    extra: Sequence[str] = (),
) -> contextlib.AbstractContextManager[ServerProcess]:  # fmt: skip
    """The product: ``python -m infer_server serve --port 0`` on ``models``, with a local socket;
    ``extra``: more of its flags."""
    args = [
        *("infer_server", "serve", "--models", str(models), "--host", "127.0.0.1", "--port", "0"),
        *("--workers", str(workers), "--batch-size", str(batch_size), "--log-level", "WARNING"),
        *(("--null-model",) if null_model else ()),
        *GRPC_SERVER_ARGS,
        *extra,
    ]
    return launched("grpc", args, shm=True, label=label, local_socket=True)


def rest_server(
    models: Path, *, workers: int, batch_size: int, null_model: bool = False, label: str = "rest"
) -> contextlib.AbstractContextManager[ServerProcess]:
    """The REST/JSON baseline in front of the same pipeline (``benchmarks/baselines``)."""
    args = [
        *("benchmarks.baselines.rest_server", "--models", str(models), "--host", "127.0.0.1", "--port", "0"),
        *("--workers", str(workers), "--batch-size", str(batch_size)),
        *(("--null-model",) if null_model else ()),
    ]
    return launched("rest", args, shm=False, label=label)


def scene_files(directory: Path, count: int = 16) -> list[str]:
    """``count`` fixed-seed 640×480 scenes written into ``directory``: the load clients' images."""
    from engines.scenes import generate_scene

    paths = []
    for seed in range(count):
        paths.append(str(directory / f"{seed}.jpg"))
        Path(paths[-1]).write_bytes(generate_scene(50_000 + seed, width=640, height=480).jpeg)
    return paths


def free_port() -> int:
    """A TCP port of loopback free now (for a server told its port, e.g. its metrics or Triton's)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
