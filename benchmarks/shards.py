"""One server against the same workers split over independent servers (shards), and both against
Triton's system shared memory, in one run, interleaved: what sharding the main process would buy.

The server's main process is one thread; at 4 clients × 8 images on 2 cores it leaves 10–17% of
the cores idle while the push's chain (client → main → worker → main → client) waits on it
(docs/performance.md). Here ``--shards K`` servers, each with ``--workers / K`` workers and its own
local socket, take ``--clients / K`` clients each, all at once: the same number of workers and
clients as the one server, but K main processes, so that K chains run independently. This
server does not shard itself yet (docs/front-scaling.md, "Shards"): the shards are separate
``serve`` processes, with the null model (the data path alone).

Per round and way (``one``, ``shards``, ``triton``; the order reversed every other round):
images/s, the share of the machine's cores left idle and the machine's CPU per image (everything
that ran: servers and clients). Then the ratios per round and their medians.

    python -m benchmarks.shards --clients 4 --images 8 --rounds 6 --json bench-out/shards-4x8.json
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import oip, peers, servers

WAYS = ("one", "triton", "shards")  # the order of a round; every other round backwards


def _together(way: str, running: Sequence[servers.ServerProcess], clients: int, seconds: float, images: int,
              paths: list[str], env: dict[str, str] | None) -> dict[str, float]:  # fmt: skip
    """``clients`` load clients split evenly over ``running``, every server's at once: images/s,
    the cores left idle and the machine's CPU per image (ms) over the run."""
    answered = [0] * len(running)

    def drive(k: int) -> None:
        answered[k] = oip.run_clients(way, running[k], clients // len(running), seconds, images, paths, env)[0]

    threads = [threading.Thread(target=drive, args=(k,)) for k in range(len(running))]
    busy, start = servers.machine_busy_seconds(), time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    busy, elapsed = servers.machine_busy_seconds() - busy, time.monotonic() - start
    idle = max(0.0, 1.0 - busy / (elapsed * (os.cpu_count() or 1)))
    return {"fps": sum(answered) / seconds, "machine_idle": idle,
            "machine_cpu_ms_per_image": 1e3 * busy / max(sum(answered), 1), "elapsed_s": elapsed}  # fmt: skip


def main(
    clients: Annotated[int, typer.Option(help="Client processes in all.")] = 4,
    images: Annotated[int, typer.Option(help="Images per request.")] = 8,
    workers: Annotated[int, typer.Option(help="Workers in all (= instances of Triton's model).")] = 2,
    shards: Annotated[int, typer.Option(help="Servers the workers and clients are split over.")] = 2,
    rounds: Annotated[int, typer.Option(help="Rounds; each measures the three ways once.")] = 6,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 8.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """One server, the same split over shards, and Triton, interleaved."""
    if workers % shards or clients % shards:
        raise typer.BadParameter("--workers and --clients must split evenly over --shards")
    models = servers.REPO_ROOT / "engines" / "models"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        paths = servers.scene_files(Path(tmp))
        running = {
            "one": [stack.enter_context(servers.grpc_server(models, workers=workers, batch_size=images,
                                                            null_model=True))],
            "shards": [stack.enter_context(servers.grpc_server(models, workers=workers // shards, batch_size=images,
                                                               null_model=True)) for _ in range(shards)],
            "triton": [stack.enter_context(peers.triton(null_model=True, models=models, workers=workers,
                                                        batch=images))],
        }  # fmt: skip

        def measure(name: str) -> dict[str, Any]:
            way, env = ("oip-shm", peers.TRITON_CLIENT_ENV) if name == "triton" else ("v1-local", None)
            return _together(way, running[name], clients, seconds, images, paths, env)

        rows = oip.back_and_forth(WAYS, rounds, measure, lambda n, row: f"round {n + 1}: " + ", ".join(
            f"{name} {row[name]['fps']:.0f} img/s ({row[name]['machine_idle']:.0%} idle, machine "
            f"{row[name]['machine_cpu_ms_per_image']:.3f} ms/img)" for name in WAYS))  # fmt: skip
    pairs = {"shards / triton": ("shards", "triton"), "one / triton": ("one", "triton"),
             "shards / one": ("shards", "one")}  # fmt: skip
    oip.pair_ratios(rows, pairs, json_out, clients=clients, images=images, workers=workers, shards=shards)


if __name__ == "__main__":
    typer.run(main)
