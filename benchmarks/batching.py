"""Dynamic batching, measured: many clients pushing one image per request (``--images``) to the server with the
models, with dynamic batching (``--max-queue-delay-us`` as given) and without, interleaved in one
run.

First, the pipeline's own batch-size scaling, in one process on one core (``scaling``): the time
per image of ``VisionPipeline.process`` on 1, 2, 4 and 8 images, and of its stages. Then, per
round (the order rotates): a closed-loop point of ``--clients`` client processes on each server
(images/s, per-image p50/p99, the server's CPU per image, and the mean number of images the models
saw per batch, from the server's ``infer_batch_images`` histogram). Then, on the batching server:
one client alone (unloaded latency) and an open-loop point at half the peak rate (latency under
load, counted from the scheduled time).

``--pin-workers`` runs both servers with their workers pinned (``infer-server serve --pin-workers``);
``--compare pinning`` instead compares two batching servers, workers pinned and not (the unloaded
and half-load points then run on the pinned one).

    .venv/bin/python -m benchmarks.batching --rounds 3 --json bench-out/batching.json
    .venv/bin/python -m benchmarks.batching --compare pinning --local-socket --rounds 4
    .venv/bin/python -m benchmarks.batching --compare pinning --clients 4 --images 8 --rounds 4
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import bounds, servers
from benchmarks.fps import _accounting
from benchmarks.loadgen import PointResult, Workload, make_workload, run_point

MODELS = servers.REPO_ROOT / "engines" / "models"


def _scaling(sizes: tuple[int, ...], repeats: int, device: str = "cpu") -> dict[int, dict[str, float]]:
    """Per image, ms: ``VisionPipeline.process`` on batches of each size (median of ``repeats``),
    and each stage's share (the outcomes' timings). Runs in a child: one thread per library."""
    from infer_server.stage.worker import limit_threads

    limit_threads(1)
    from engines.scenes import generate_scene
    from infer_server.messages import ImageRef
    from infer_server.settings import ServerSettings
    from infer_server.stage.pipeline import VisionPipeline

    pipeline = VisionPipeline.load(MODELS, ServerSettings(batch_size=max(sizes), device=device).worker_options())
    pipeline.warm_up()
    jpegs = [generate_scene(2026 + i, width=1280, height=720).jpeg for i in range(max(sizes))]
    out: dict[int, dict[str, float]] = {}
    for size in sizes:
        images = [(ImageRef(i, 0, len(j)), j) for i, j in enumerate(jpegs[:size])]
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            outcomes = list(pipeline.process("scaling", images))
            runs.append(((time.perf_counter() - t0) * 1e3 / size, outcomes))
        runs.sort(key=lambda r: r[0])
        per_image, outcomes = runs[len(runs) // 2]
        stages: dict[str, float] = {}
        for outcome in outcomes:
            for stage, ms in outcome.timings_ms:
                stages[stage] = stages.get(stage, 0.0) + ms / size
        out[size] = {"per_image_ms": per_image, **{f"{k}_ms": v for k, v in stages.items()}}
    pipeline.close()
    return out


def scaling(sizes: tuple[int, ...] = (1, 2, 4, 8), repeats: int = 7, device: str = "cpu"
            ) -> dict[int, dict[str, float]]:  # fmt: skip
    """``_scaling`` in a fresh process (spawned: the libraries' threads are set before they load)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_scaling, (sizes, repeats, device))


# What each comparison runs: two servers, (name, their flags); the first one is the product's
# configuration under test (its rate is the peak; the latency points run on it).
ARMS = {
    "batching": (("batching", ("--dynamic-batching",)), ("single", ("--no-dynamic-batching",))),
    "pinning": (("pinned", ("--dynamic-batching", "--pin-workers")), ("unpinned", ("--dynamic-batching",))),
}


@contextlib.contextmanager
def _server(name: str, flags: tuple[str, ...], delay_us: int, workers: int, batch_size: int
            ) -> Iterator[tuple[Any, int]]:  # fmt: skip
    port = servers.free_port()
    servers.GRPC_SERVER_ARGS[:] = [*flags, "--max-queue-delay-us", str(delay_us), "--metrics-port", str(port)]
    try:
        with servers.grpc_server(MODELS, workers=workers, batch_size=batch_size, label=name) as server:
            yield server, port
    finally:
        servers.GRPC_SERVER_ARGS[:] = []


def _batch_images(port: int) -> tuple[float, float]:
    """The server's ``infer_batch_images`` histogram so far: (sum, count)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = {k: float(v) for k, v in re.findall(r"^infer_batch_images_(sum|count) (\S+)$", text, re.M)}
    return found.get("sum", 0.0), found.get("count", 0.0)


def _point(workload: Workload, server: Any, port: int, clients: int, rate: float | None = None,
           local: bool = False) -> dict[str, Any]:  # fmt: skip
    before = _batch_images(port)
    transport = f"local:{server.local_socket}" if local else "tmpfs"
    result: PointResult = run_point(workload, transport, server.address, str(server.shm_dir), clients, window_s=3.0,
                                    max_s=24.0, warmup_s=3.0, accounting=_accounting(server), rate_images=rate,
                                    min_s=9.0 if rate else 0.0)  # fmt: skip
    after = _batch_images(port)
    bound = bounds.cpu_bound(result.stage_ms, result.cpu_ms_per_image.get("workers"), len(os.sched_getaffinity(0)))
    return {
        "fps": result.fps, "cpu_bound_fps": bound.fps, "ratio_to_bound": result.fps / bound.fps,
        "image_p50_ms": result.percentile("image", 50), "image_p99_ms": result.percentile("image", 99),
        "cpu_ms_per_image": result.cpu_ms_per_image.get("front", 0.0) + result.cpu_ms_per_image.get("workers", 0.0),
        "front_cpu_ms_per_image": result.cpu_ms_per_image.get("front", 0.0),
        "mean_batch_images": (after[0] - before[0]) / max(after[1] - before[1], 1.0),
        "errors": result.errors, "other_cores": result.other_cores,
    }  # fmt: skip


def main(
    rounds: Annotated[int, typer.Option(help="Rounds; each runs both servers once.")] = 3,
    clients: Annotated[int, typer.Option(help="Client processes.")] = 16,
    images: Annotated[int, typer.Option(help="Images per request.")] = 1,
    delay_us: Annotated[int, typer.Option(help="--max-queue-delay-us of the batching server.")] = 0,
    workers: Annotated[int, typer.Option(help="Stage workers of each server.")] = 2,
    batch_size: Annotated[int, typer.Option(help="--batch-size of each server.")] = 8,
    device: Annotated[str, typer.Option(help="cpu, or gpu (TensorRT): the device of the scaling curve.")] = "cpu",
    scaling_only: Annotated[bool, typer.Option(help="Only the pipeline's batch-size scaling, no servers.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    local_socket: Annotated[bool, typer.Option(help="The clients' sessions on the server's local socket.")] = False,
    compare: Annotated[str, typer.Option(help="batching (with and without) or pinning (workers pinned or not).")]
    = "batching",
    pin_workers: Annotated[bool, typer.Option(help="Both servers with --pin-workers (--compare batching).")] = False,
) -> None:
    """Single-image requests from many clients, with and without dynamic batching (or pinning)."""
    curve = scaling(device=device)
    for size, row in curve.items():
        print(f"pipeline on {size} image(s): {row['per_image_ms']:.1f} ms per image (detector "
              f"{row.get('detector_ms', 0):.1f}, decode {row.get('decode_ms', 0):.1f}, attributes "
              f"{row.get('attributes_ms', 0):.1f})")  # fmt: skip
    if scaling_only:
        return
    if compare not in ARMS:
        raise typer.BadParameter(f"--compare: one of {', '.join(ARMS)}")
    pin = ("--pin-workers",) if pin_workers and compare == "batching" else ()
    arms = [(name, (*flags, *pin)) for name, flags in ARMS[compare]]
    (first, _), (second, _) = arms
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workload = make_workload(16, images, Path(tmp))
        started = {name: stack.enter_context(_server(name, flags, delay_us, workers, batch_size))
                   for name, flags in arms}  # fmt: skip
        rows = []
        for n in range(rounds):
            order = list(started.items())[:: 1 if n % 2 == 0 else -1]
            row = {name: _point(workload, srv, port, clients, local=local_socket) for name, (srv, port) in order}
            row["ratio"] = row[first]["fps"] / row[second]["fps"]
            rows.append(row)
            print(f"round {n + 1}: " + ", ".join(
                f"{name} {row[name]['fps']:.1f} img/s (p99 {row[name]['image_p99_ms']:.0f} ms, "
                f"{row[name]['cpu_ms_per_image']:.1f} ms CPU/img, {row[name]['mean_batch_images']:.1f} img/batch, "
                f"{row[name]['ratio_to_bound']:.2f} x its CPU-time bound)"
                for name in (first, second)) + f", ratio {row['ratio']:.2f}")  # fmt: skip
        peak = statistics.median(r[first]["fps"] for r in rows)
        unloaded = _point(workload, *started[first], clients=1, local=local_socket)
        half = _point(workload, *started[first], clients=clients, rate=peak / 2, local=local_socket)
    summary: dict[str, Any] = {
        "median_ratio": statistics.median(r["ratio"] for r in rows),
        "median_ratio_to_bound": {name: statistics.median(r[name]["ratio_to_bound"] for r in rows)
                                  for name in (first, second)},  # fmt: skip
        "unloaded_p99_ms": unloaded["image_p99_ms"], "half_load_p99_ms": half["image_p99_ms"],
        "half_load_fps": half["fps"], "half_load_mean_batch_images": half["mean_batch_images"],
    }  # fmt: skip
    print(f"median ratio {first} / {second}: {summary['median_ratio']:.2f}; of the CPU-time bound: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["median_ratio_to_bound"].items())
          + f"; p99 unloaded {unloaded['image_p99_ms']:.0f} ms, at half load ({half['fps']:.1f} img/s) "
          f"{half['image_p99_ms']:.0f} ms")  # fmt: skip
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"scaling": curve, "rounds": rows, "unloaded": unloaded, "half_load": half, "summary": summary,
               "clients": clients, "images": images, "delay_us": delay_us, "workers": workers, "batch_size": batch_size,
               "compare": compare, "arms": dict(arms), "local_socket": local_socket}  # fmt: skip
        json_out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    typer.run(main)
