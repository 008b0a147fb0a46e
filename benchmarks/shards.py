"""One server against the same server in shards (``--shards K``), against the same workers split
over independent servers, and all three against Triton's system shared memory, in one run,
interleaved: what sharding the main process buys.

The server's main process is one thread; at 4 clients × 8 images on 2 cores it leaves 10–17% of
the cores idle while the push's chain (client → main → worker → main → client) waits on it
(docs/performance.md). ``--shards K`` makes the server K data planes (docs/front-scaling.md,
"Shards"): the same number of workers and clients, but K main processes, so that K chains run
independently, the client library spreading its sessions over them. ``split`` is what it stands
against: K independent ``serve`` processes, each with ``--workers / K`` workers and its own local
socket, taking ``--clients / K`` clients each (no routing at all). Null model: the data path alone.

Per round and way (``one``, ``triton``, ``sharded``, ``split``; the order reversed every other
round): images/s, the share of the machine's cores left idle, the machine's CPU per image
(everything that ran: servers and clients) and the server's (main processes and workers; Triton:
its server and its Python stubs; the JSON has them apart, and the clients'). Then the ratios per
round and their medians: of images/s, and of the server's CPU per image, sharded against Triton.

    python -m benchmarks.shards --clients 4 --images 8 --rounds 6 --json bench-out/shards-4x8.json
    python -m benchmarks.shards --clients 16 --images 1 --batch 8 --rounds 4   # batching across requests

Every server's ``--batch-size`` (Triton's ``max_batch_size``) is ``--images`` unless ``--batch``
says otherwise: at one image per request, ``--batch 8`` is the setting ``benchmarks.peers`` (and a
fleet of cameras) runs, where both servers batch across requests.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import oip, peers, servers

WAYS = ("one", "triton", "sharded", "split")  # the order of a round; every other round backwards


def _together(way: str, running: Sequence[servers.ServerProcess], clients: int, seconds: float, images: int,
              paths: list[str], env: dict[str, str] | None) -> dict[str, float]:  # fmt: skip
    """``clients`` load clients split evenly over ``running``, every server's at once: images/s,
    the cores left idle, the machine's CPU per image (ms) over the run, and the servers' (their
    main processes with any shards and front processes, their workers: Triton's server and its
    Python stubs) and the clients' CPU per image."""
    answered = [0] * len(running)
    main_s, workers_s, clients_s = ([0.0] * len(running) for _ in range(3))  # CPU seconds per server

    def drive(k: int) -> None:
        during: dict[str, float] = {}
        answered[k], before, after = oip.run_clients(way, running[k], clients // len(running), seconds, images,
                                                     paths, env, during)  # fmt: skip
        main_s[k] = after[0] + after[1] - before[0] - before[1]
        workers_s[k], clients_s[k] = after[2] - before[2], during.get("clients_cpu", 0.0)

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(len(running))]
    busy, start = servers.machine_busy_seconds(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy, elapsed = servers.machine_busy_seconds() - busy, time.monotonic() - start
    idle = max(0.0, 1.0 - busy / (elapsed * (os.cpu_count() or 1)))
    per_image = 1e3 / max(sum(answered), 1)
    return {"fps": sum(answered) / seconds, "machine_idle": idle, "machine_cpu_ms_per_image": busy * per_image,
            "server_cpu_ms_per_image": (sum(main_s) + sum(workers_s)) * per_image,
            "main_cpu_ms_per_image": sum(main_s) * per_image, "workers_cpu_ms_per_image": sum(workers_s) * per_image,
            "clients_cpu_ms_per_image": sum(clients_s) * per_image, "elapsed_s": elapsed}  # fmt: skip


def main(
    clients: Annotated[int, typer.Option(help="Client processes in all.")] = 4,
    images: Annotated[int, typer.Option(help="Images per request.")] = 8,
    batch: Annotated[int | None, typer.Option(help="Every server's --batch-size = Triton's max_batch_size "
                                              "(both batch across requests up to it); default --images.")] = None,
    workers: Annotated[int, typer.Option(help="Workers in all (= instances of Triton's model).")] = 2,
    shards: Annotated[int, typer.Option(help="Shards of the sharded server; servers of the split one.")] = 2,
    rounds: Annotated[int, typer.Option(help="Rounds; each measures the three ways once.")] = 6,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 8.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """One server, the same in shards, split over servers, and Triton, interleaved."""
    if workers % shards or clients % shards:
        raise typer.BadParameter("--workers and --clients must split evenly over --shards")
    models = servers.REPO_ROOT / "engines" / "models"
    batch = batch or images
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        paths = servers.scene_files(Path(tmp))
        running = {
            "one": [stack.enter_context(servers.grpc_server(models, workers=workers, batch_size=batch,
                                                            null_model=True))],
            "sharded": [stack.enter_context(servers.grpc_server(models, workers=workers, batch_size=batch,
                                                                null_model=True, extra=("--shards", str(shards))))],
            "split": [stack.enter_context(servers.grpc_server(models, workers=workers // shards, batch_size=batch,
                                                              null_model=True)) for _ in range(shards)],
            "triton": [stack.enter_context(peers.triton(null_model=True, models=models, workers=workers,
                                                        batch=batch))],
        }  # fmt: skip

        def measure(name: str) -> dict[str, Any]:
            way, env = ("oip-shm", peers.TRITON_CLIENT_ENV) if name == "triton" else ("v1-local", None)
            return _together(way, running[name], clients, seconds, images, paths, env)

        rows = oip.back_and_forth(WAYS, rounds, measure, lambda n, row: f"round {n + 1}: " + ", ".join(
            f"{name} {row[name]['fps']:.0f} img/s ({row[name]['machine_idle']:.0%} idle, ms/img: machine "
            f"{row[name]['machine_cpu_ms_per_image']:.3f}, server {row[name]['server_cpu_ms_per_image']:.3f})"
            for name in WAYS))  # fmt: skip
    pairs = {"sharded / triton": ("sharded", "triton"), "one / triton": ("one", "triton"),
             "sharded / one": ("sharded", "one"), "sharded / split": ("sharded", "split")}  # fmt: skip
    # The server's CPU per image against Triton's (its server and stubs), round by round.
    cpu = [r["sharded"]["server_cpu_ms_per_image"] / r["triton"]["server_cpu_ms_per_image"] for r in rows]
    print(f"server CPU per image, sharded / triton: median {statistics.median(cpu):.2f} (rounds "
          + " ".join(f"{x:.2f}" for x in cpu) + ")")  # fmt: skip
    oip.pair_ratios(rows, pairs, json_out, clients=clients, images=images, batch=batch, workers=workers,
                    shards=shards,
                    server_cpu_sharded_over_triton=cpu)  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
