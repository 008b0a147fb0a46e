"""This server's throughput against the cores it is given (``taskset``), in one run, interleaved:
one null-model server per core set, all up at once, the same client processes (unpinned) taking
turns on each. Shows where the one-process front stops scaling: its CPU per image against the
workers', per workload.

    .venv/bin/python -m benchmarks.cores --cores 0 --cores 0,1 --json bench-out/cores.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import oip, servers


def _measure(server: servers.ServerProcess, clients: int, batch: int, seconds: float,
             images: list[str]) -> dict[str, float]:  # fmt: skip
    front0, workers0 = server.cpu()
    started = time.perf_counter()
    procs = oip._clients("v1-tmpfs", server, clients, seconds, batch, images)
    answered = sum(int(p.communicate(timeout=seconds + 120)[0].strip() or 0) for p in procs)
    elapsed = time.perf_counter() - started
    front1, workers1 = server.cpu()
    n = max(1, answered)
    return {"fps": answered / elapsed, "front_cpu_ms": 1e3 * (front1 - front0) / n,
            "workers_cpu_ms": 1e3 * (workers1 - workers0) / n,
            "front_busy": (front1 - front0) / elapsed}  # fmt: skip


def main(
    cores: Annotated[list[str], typer.Option(help="Core sets, as taskset -c takes them; repeatable.")] = ["0", "0,1"],  # noqa: B006
    rounds: Annotated[int, typer.Option(help="Rounds; each measures every core set once per workload.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 8.0,
    workloads: Annotated[str, typer.Option(help="CLIENTSxIMAGES per request, comma-separated.")] = "16x1,4x8",
    workers: Annotated[int, typer.Option(help="Stage workers of each server.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Null-model throughput per core set, interleaved."""
    shapes = [tuple(int(x) for x in w.split("x")) for w in workloads.split(",")]
    models = servers.REPO_ROOT / "engines" / "models"
    args = ["infer_server", "serve", "--null-model", "--models", str(models), "--host", "127.0.0.1", "--port", "0",
            "--workers", str(workers), "--batch-size", "8", "--log-level", "WARNING"]  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        images = servers.scene_files(Path(tmp))
        running = {c: stack.enter_context(servers.launched("grpc", args, shm=True, label=f"cores-{c}",
                                                           wrapper=("taskset", "-c", c))) for c in cores}  # fmt: skip
        for clients, batch in shapes:
            rows = []
            for n in range(rounds):
                order = cores[n % len(cores) :] + cores[: n % len(cores)]
                rows.append({c: _measure(running[c], clients, batch, seconds, images) for c in order})
                print(f"{clients} x {batch}, round {n + 1}: " + ", ".join(
                    f"cores {c}: {rows[-1][c]['fps']:.0f} img/s (front {rows[-1][c]['front_cpu_ms']:.3f} ms/img, "
                    f"{rows[-1][c]['front_busy']:.2f} of a core; workers {rows[-1][c]['workers_cpu_ms']:.3f})"
                    for c in cores))  # fmt: skip
            median = {c: {k: statistics.median(r[c][k] for r in rows) for k in rows[0][c]} for c in cores}
            results[f"{clients}x{batch}"] = {"rounds": rows, "median": median}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"workers": workers, "workloads": results}, indent=1))


if __name__ == "__main__":
    typer.run(main)
