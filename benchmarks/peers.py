"""This server beside Triton, in one run, interleaved, on the same cores, with the same pipeline code
(``benchmarks/triton_peer/model.py``): only the serving layer differs.

Triton is NVIDIA's own ``tritonserver``, the binary nvidia-pytriton's wheel bundles (``.venv-peers``,
``requirements/peers.txt``), with a Python-backend model (one instance per worker, Triton's dynamic
batcher up to ``--batch``, ``max_queue_delay_microseconds`` 0) around ``NullPipeline`` (the data path:
read and header check) or, with ``--models``, ``VisionPipeline``. Its clients are tritonclient,
unmodified (``.venv-triton``), with inline bytes and with Triton's system shared memory; this
server's are its own client library over tmpfs and inline bytes, on gRPC and on the server's local
socket (``--local-socket``: the Session without gRPC) (``oip_clients/``).

Per workload (client processes × images per request) and round: images/s and
the server's CPU per image (the process and its children: front and workers, tritonserver and its
Python stubs) for each way in, the share of the machine's cores left idle, how long the server's
main process (its threads together) was ready to run but waited for a core (the kernel's
``schedstat``), the clients' CPU per image (each client measures its own), and the ratios the
targets are written in: tmpfs ÷ Triton's system shared memory, inline ÷ Triton's bytes (each on
gRPC and on the local socket). Each Triton way runs between the two of ours it is compared with
(``ORDER``), the order reversed every other round: the VM's speed drifts by up to 1.5× within
minutes, and a ratio of two neighbours, each first in half the rounds, carries the least of that
drift.

    make bench-peers        # = .venv/bin/python -m benchmarks.peers --json bench-out/peers.json
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from benchmarks import oip, servers
from infer_proto import inference_pb2, inference_pb2_grpc

PEERS_VENV = servers.REPO_ROOT / ".venv-peers"
MODEL = Path(__file__).resolve().parent / "triton_peer" / "model.py"
OURS = ("v1-local", "v1-tmpfs", "v1-local-inline", "v1-inline")  # oip.py's ways: ours, then Triton's
TRITON = ("oip-shm", "oip-inline")
# Triton's load clients send [BATCH, 1]: the peer model has Triton's batch dimension (max_batch_size).
TRITON_CLIENT_ENV = {"TRITON_LOAD_BATCHED": "1"}
# Every way next to what it is compared with (PAIRS), run forwards and backwards in turn.
ORDER = ("v1-local", "oip-shm", "v1-tmpfs", "v1-local-inline", "oip-inline", "v1-inline")
PAIRS = {"local socket / Triton shm": ("v1-local", "oip-shm"), "tmpfs / Triton shm": ("v1-tmpfs", "oip-shm"),
         "local inline / Triton bytes": ("v1-local-inline", "oip-inline"),
         "inline / Triton bytes": ("v1-inline", "oip-inline")}  # fmt: skip


def _site_packages(venv: Path) -> Path:
    found = next(venv.glob("lib/python3*/site-packages"), None)
    if found is None:
        raise FileNotFoundError(f"{venv} is not installed: make {venv.name}/.installed")
    return found


def _repository(root: Path, *, null_model: bool, models: Path, workers: int, batch: int) -> Path:
    """Triton's model repository: ``pipeline``, the peer model, and the paths it imports from."""
    peers = _site_packages(PEERS_VENV)
    numpy_only = root / "numpy1"
    numpy_only.mkdir()
    for name in ("numpy", "numpy.libs"):
        if (peers / name).exists():
            (numpy_only / name).symlink_to(peers / name)
    version = root / "repo" / "pipeline" / "1"
    version.mkdir(parents=True)
    shutil.copy(MODEL, version / "model.py")
    paths = [str(servers.REPO_ROOT / "src"), str(numpy_only), str(_site_packages(servers.REPO_ROOT / ".venv"))]
    (version / "paths.json").write_text(json.dumps(paths))
    params = {"null_model": "1" if null_model else "0", "batch_size": str(batch), "models": str(models)}
    (version.parent / "config.pbtxt").write_text(f"""name: "pipeline"
backend: "python"
max_batch_size: {batch}
input [ {{ name: "IMAGES" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [ {{ name: "DETECTIONS" data_type: TYPE_STRING dims: [ 1 ] }},
         {{ name: "STATUS" data_type: TYPE_INT32 dims: [ 1 ] }} ]
instance_group [ {{ count: {workers} kind: KIND_CPU }} ]
dynamic_batching {{ max_queue_delay_microseconds: 0 }}
parameters [ {", ".join(f'{{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())} ]
""")  # fmt: skip
    return root / "repo"


def _ready(address: str, process: subprocess.Popen[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        while time.monotonic() < end and process.poll() is None:
            with contextlib.suppress(grpc.RpcError):
                if stub.ModelReady(inference_pb2.ModelReadyRequest(name="pipeline"), timeout=2).ready:
                    return
            time.sleep(0.5)
    raise RuntimeError("tritonserver did not become ready")


@contextlib.contextmanager
def triton(*, null_model: bool, models: Path, workers: int, batch: int) -> Iterator[servers.ServerProcess]:
    """``tritonserver`` on a free port with the peer model, until the block ends."""
    bundled = _site_packages(PEERS_VENV) / "pytriton" / "tritonserver"
    with tempfile.TemporaryDirectory(prefix="triton-peer-") as tmp:
        root = Path(tmp)
        server_dir = root / "tritonserver"  # as pytriton does: the bundle, with the stub of this Python
        shutil.copytree(bundled, server_dir, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy(bundled / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}"
                    / "triton_python_backend_stub", server_dir / "backends" / "python")  # fmt: skip
        repo = _repository(root, null_model=null_model, models=models, workers=workers, batch=batch)
        port = servers.free_port()
        cmd = [str(server_dir / "bin" / "tritonserver"), "--model-repository", str(repo),
               "--backend-directory", str(server_dir / "backends"), "--grpc-port", str(port),
               "--allow-http", "false", "--allow-metrics", "false", "--exit-timeout-secs", "5"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["LD_LIBRARY_PATH"] = str(_site_packages(PEERS_VENV) / "nvidia_pytriton.libs")
        log_path = root / "tritonserver.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env)
        server = servers.ServerProcess("triton", process, log_path, Path("/dev/shm"), address=f"127.0.0.1:{port}")
        try:
            try:
                _ready(server.address, process, 300.0)
            except RuntimeError:
                raise RuntimeError(f"tritonserver did not start:\n{log_path.read_text()[-3000:]}") from None
            yield server
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _workload(clients: int, batch: int, rounds: int, seconds: float, ours: Any, theirs: Any,
              images: list[str]) -> dict[str, Any]:  # fmt: skip
    ways = [*OURS, *TRITON]
    assert sorted(ORDER) == sorted(ways), "ORDER runs every way once"

    def measure(way: str) -> dict[str, Any]:
        server, env = (ours, None) if way in OURS else (theirs, TRITON_CLIENT_ENV)
        return oip._measure(way, server, clients, seconds, batch, images, env)

    def line(n: int, row: dict[str, Any]) -> str:
        return f"  {clients} x {batch}, round {n + 1}: " + ", ".join(
            f"{w} {row[w]['fps']:.0f} img/s ({row[w]['server_cpu_ms_per_image']:.2f} ms, "
            f"{row[w]['machine_idle']:.0%} idle)" for w in ways)  # fmt: skip

    rows = oip.back_and_forth(ORDER, rounds, measure, line)
    ratios = {name: statistics.median(r[a]["fps"] / r[b]["fps"] for r in rows) for name, (a, b) in PAIRS.items()}
    cpu = {way: statistics.median(r[way]["server_cpu_ms_per_image"] for r in rows) for way in ways}
    by_role = {way: {role: statistics.median(r[way]["server_cpu_ms_per_image_by_role"][role] for r in rows)
                     for role in ("main", "workers")} for way in ways}  # fmt: skip
    idle = {way: statistics.median(r[way]["machine_idle"] for r in rows) for way in ways}
    waiting = {way: statistics.median(r[way]["main_waiting"] for r in rows) for way in ways}
    clients_cpu = {way: statistics.median(r[way]["clients_cpu_ms_per_image"] for r in rows) for way in ways}
    print(f"  {clients} x {batch}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
          + "; server CPU ms/img " + ", ".join(f"{w} {v:.2f}" for w, v in cpu.items())
          + "; of it, main process / workers (Triton: tritonserver / its Python stubs) "
          + ", ".join(f"{w} {v['main']:.3f}/{v['workers']:.3f}" for w, v in by_role.items())
          + "; the machine's cores idle " + ", ".join(f"{w} {v:.0%}" for w, v in idle.items())
          + "; the main process (tritonserver) ready but waiting for a core, thread-seconds per second "
          + ", ".join(f"{w} {v:.2f}" for w, v in waiting.items())
          + "; the clients' CPU ms/img " + ", ".join(f"{w} {v:.3f}" for w, v in clients_cpu.items()))  # fmt: skip
    return {"clients": clients, "batch": batch, "rounds": rows, "median_ratio": ratios, "median_cpu_ms": cpu,
            "median_cpu_ms_by_role": by_role, "median_machine_idle": idle, "median_main_waiting": waiting,
            "median_clients_cpu_ms": clients_cpu}  # fmt: skip


def main(
    rounds: Annotated[int, typer.Option(help="Rounds per workload; each runs every way once.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 8.0,
    workloads: Annotated[str, typer.Option(help="CLIENTSxIMAGES per request, comma-separated.")] = "16x1,4x8",
    full: Annotated[bool, typer.Option(help="The models (VisionPipeline) instead of the null model.")] = False,
    workers: Annotated[int, typer.Option(help="Workers of this server = instances of Triton's model.")] = 2,
    batch: Annotated[int, typer.Option(help="--batch-size = Triton's max_batch_size.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    server_arg: Annotated[list[str] | None, typer.Option(help="A flag for this server, e.g. "
                                                         "--server-arg=--realtime-priority=1 (repeatable).")] = None,
) -> None:
    """This server and Triton, same pipeline, same workloads, interleaved."""
    models = servers.REPO_ROOT / "engines" / "models"
    shapes = [tuple(int(x) for x in w.split("x")) for w in workloads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        images = servers.scene_files(Path(tmp))
        with (servers.grpc_server(models, workers=workers, batch_size=batch, null_model=not full,
                                  extra=server_arg or ()) as ours,
              triton(null_model=not full, models=models, workers=workers, batch=batch) as theirs):  # fmt: skip
            results = [_workload(c, b, rounds, seconds, ours, theirs, images) for c, b in shapes]
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"workloads": results, "null_model": not full, "workers": workers, "batch": batch,
               "server_args": server_arg or []}
        json_out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    typer.run(main)
