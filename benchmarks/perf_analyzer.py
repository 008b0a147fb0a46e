"""``perf_analyzer``, Triton's own load tool, unmodified, against this server's Open Inference
Protocol, beside the benchmark's own figures for the same workload on the same server, interleaved.

perf_analyzer is installed by ``make .venv-perf/.installed`` (``requirements/perf.txt``: the binary
ships in tritonclient's wheel up to 2.51; it links ``libcudart.so.12``, from the CUDA runtime wheel,
and ``libb64.so.0d``, Debian's ``libb64-0d``). It needs no GPU for ``--shared-memory none`` or
``system``. The server serves its regions from ``--shm-dir /dev/shm`` (perf_analyzer makes them
with ``shm_open``) and, since perf_analyzer asks every output into a region too, is told whose
files it may write outputs into (``--region-write-owners``).

    .venv/bin/python -m benchmarks.perf_analyzer --rounds 3 --json bench-out/perf_analyzer.json

One round: perf_analyzer with inline bytes and with system shared memory, then ``benchmarks.oip``'s
ways (``v1-tmpfs``, ``oip-inline``, ``oip-shm``) with as many client processes as perf_analyzer's
concurrency and the same images per request; the order rotates each round.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer

from benchmarks import oip, servers
from infer_proto import inference_pb2, inference_pb2_grpc

PERF_VENV = servers.REPO_ROOT / ".venv-perf"
PERF_ANALYZER = PERF_VENV / "bin" / "perf_analyzer"
WAYS = ("pa-inline", "pa-shm", "v1-tmpfs", "oip-inline", "oip-shm")


def environment() -> dict[str, str]:
    """perf_analyzer's environment: its CUDA runtime library (loaded even when no GPU is used)."""
    runtime = next(PERF_VENV.glob("lib/python3*/site-packages/nvidia/cuda_runtime/lib"), None)
    if not PERF_ANALYZER.exists() or runtime is None:
        raise FileNotFoundError(f"{PERF_ANALYZER} is not installed: make {PERF_VENV.name}/.installed")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(runtime), env.get("LD_LIBRARY_PATH")]))
    return env


def input_data(images: Sequence[bytes], per_request: int, path: Path) -> Path:
    """perf_analyzer's ``--input-data`` file: one step per request, ``IMAGES`` as the BYTES tensor's
    raw form (each element's 4-byte little-endian length, then its bytes) in base64."""
    steps = []
    for start in range(0, len(images), per_request):
        chunk = [images[(start + k) % len(images)] for k in range(per_request)]
        raw = b"".join(struct.pack("<I", len(image)) + image for image in chunk)
        steps.append({"IMAGES": {"b64": base64.b64encode(raw).decode(), "shape": [per_request]}})
    path.write_text(json.dumps({"data": steps}))
    return path


def command(address: str, data: Path, *, shared_memory: str, concurrency: int, csv_path: Path,
            interval_ms: int = 3000, stability: int = 10) -> list[str]:  # fmt: skip
    """The documented perf_analyzer command (benchmarks/README.md), with a CSV report. ``stability``:
    the % within which three windows must agree (perf_analyzer's own default, 10)."""
    return [str(PERF_ANALYZER), "-m", "pipeline", "-i", "grpc", "-u", address, "--input-data", str(data),
            "--shared-memory", shared_memory, "--output-shared-memory-size", str(1 << 20),
            "--concurrency-range", str(concurrency), "--measurement-interval", str(interval_ms),
            "--stability-percentage", str(stability), "--max-trials", "10", "-f", str(csv_path)]  # fmt: skip


def run(address: str, data: Path, *, shared_memory: str, concurrency: int, interval_ms: int = 3000,
        stability: int = 10) -> dict[str, Any]:  # fmt: skip
    """One perf_analyzer run: its CSV row (``Inferences/Second`` counts requests), its output."""
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "pa.csv"
        args = command(address, data, shared_memory=shared_memory, concurrency=concurrency, csv_path=csv_path,
                       interval_ms=interval_ms, stability=stability)  # fmt: skip
        done = subprocess.run(args, capture_output=True, text=True, env=environment(), timeout=300)
        rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    return {"returncode": done.returncode, "output": done.stdout + done.stderr, "row": rows[0] if rows else {}}


def _answered(address: str) -> int:
    """Images the server's ``pipeline`` has answered so far (its ModelStatistics)."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelStatistics(inference_pb2.ModelStatisticsRequest(name="pipeline"))
    return int(reply.model_stats[0].inference_count)


def _perf_analyzer_way(way: str, address: str, data: Path, clients: int, batch: int,
                       server: servers.ServerProcess) -> dict[str, float]:  # fmt: skip
    """perf_analyzer's rate (its requests/s × images per request), its p99, and the server's CPU
    per image over the whole run (warm-up and trials: every image it sent)."""
    front0, workers0 = server.cpu()
    images0 = _answered(address)
    result = run(address, data, shared_memory="system" if way == "pa-shm" else "none", concurrency=clients)
    front1, workers1 = server.cpu()
    images = _answered(address) - images0
    if result["returncode"] != 0 or not result["row"]:
        raise RuntimeError(f"perf_analyzer failed:\n{result['output'][-3000:]}")
    requests_per_s = float(result["row"]["Inferences/Second"])
    p99_us = float(result["row"].get("p99 latency", 0) or 0)
    cpu_ms = 1e3 * (front1 - front0 + workers1 - workers0) / max(1, images)
    return {"fps": requests_per_s * batch, "p99_ms": p99_us / 1000, "server_cpu_ms_per_image": cpu_ms}


def main(
    rounds: Annotated[int, typer.Option(help="Rounds; each runs every way once.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per benchmark-client measurement.")] = 10.0,
    clients: Annotated[int, typer.Option(help="perf_analyzer's concurrency = client processes.")] = 4,
    batch: Annotated[int, typer.Option(help="Images per request.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """perf_analyzer and the benchmark's clients, interleaved, on one null-model server."""
    environment()  # fail before starting anything
    writers = ("--region-write-owners", str(os.geteuid()))
    with tempfile.TemporaryDirectory() as tmp, oip.null_server(batch, *writers, label="perf-analyzer") as server:
        paths = servers.scene_files(Path(tmp))
        data = input_data([Path(p).read_bytes() for p in paths], batch, Path(tmp) / "images.json")

        def measure(way: str) -> dict[str, float]:
            if way.startswith("pa-"):
                return _perf_analyzer_way(way, server.address, data, clients, batch, server)
            return oip._measure(way, server, clients, seconds, batch, paths)

        oip.interleaved(WAYS, rounds, measure, json_out, clients=clients, batch=batch)


if __name__ == "__main__":
    typer.run(main)
