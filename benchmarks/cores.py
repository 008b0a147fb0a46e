"""This server's throughput against the cores it is given (``taskset``) and its gRPC front
processes (``--fronts``), in one run, interleaved: one null-model server per configuration, all up
at once, the same client processes (unpinned) taking turns on each. Shows where the one-process
front stops scaling: the main process's CPU per image, the front processes' and the workers', per
workload.

    .venv/bin/python -m benchmarks.cores --server 0 --server 0,1 --server 0,1:2 --json bench-out/cores.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import oip, servers


def _measure(server: servers.ServerProcess, clients: int, batch: int, seconds: float,
             images: list[str]) -> dict[str, float]:  # fmt: skip
    answered, before, after = oip.run_clients("v1-tmpfs", server, clients, seconds, batch, images)
    main, fronts, workers = (b - a for a, b in zip(before, after, strict=True))
    n = max(1, answered)
    return {"fps": answered / seconds, "main_cpu_ms": 1e3 * main / n, "fronts_cpu_ms": 1e3 * fronts / n,
            "workers_cpu_ms": 1e3 * workers / n, "main_busy": main / seconds}  # fmt: skip


def _line(name: str, row: dict[str, float]) -> str:
    fronts = f" + fronts {row['fronts_cpu_ms']:.3f}" if row["fronts_cpu_ms"] else ""
    return (f"{name}: {row['fps']:.0f} img/s (main {row['main_cpu_ms']:.3f}{fronts} ms/img, main "
            f"{row['main_busy']:.2f} of a core; workers {row['workers_cpu_ms']:.3f})")  # fmt: skip


def main(
    server: Annotated[list[str], typer.Option(help="CORES[:FRONTS]: a core set as taskset -c takes it, and the "
                                               "server's --fronts (default 0); repeatable.")] = ["0", "0,1"],  # noqa: B006
    rounds: Annotated[int, typer.Option(help="Rounds; each measures every server once per workload.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 8.0,
    workloads: Annotated[str, typer.Option(help="CLIENTSxIMAGES per request, comma-separated.")] = "16x1,4x8",
    workers: Annotated[int, typer.Option(help="Stage workers of each server.")] = 2,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Null-model throughput per configuration, interleaved."""
    shapes = [tuple(int(x) for x in w.split("x")) for w in workloads.split(",")]
    models = servers.REPO_ROOT / "engines" / "models"
    args = ["infer_server", "serve", "--null-model", "--models", str(models), "--host", "127.0.0.1", "--port", "0",
            "--workers", str(workers), "--batch-size", "8", "--log-level", "WARNING"]  # fmt: skip
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        images = servers.scene_files(Path(tmp))
        running = {}
        for name in server:
            cores, _, fronts = name.partition(":")
            running[name] = stack.enter_context(servers.launched(
                "grpc", [*args, "--fronts", fronts or "0"], shm=True, label=f"cores-{cores}-fronts-{fronts or 0}",
                wrapper=("taskset", "-c", cores)))  # fmt: skip
        for clients, batch in shapes:
            rows = []
            for n in range(rounds):
                order = server[n % len(server) :] + server[: n % len(server)]
                rows.append({c: _measure(running[c], clients, batch, seconds, images) for c in order})
                print(f"{clients} x {batch}, round {n + 1}: " + "; ".join(_line(c, rows[-1][c]) for c in server))
            median = {c: {k: statistics.median(r[c][k] for r in rows) for k in rows[0][c]} for c in server}
            results[f"{clients}x{batch}"] = {"rounds": rows, "median": median}
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"workers": workers, "workloads": results}, indent=1))


if __name__ == "__main__":
    typer.run(main)
