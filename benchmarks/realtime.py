"""The main process's event loop at SCHED_FIFO (``--realtime-priority``) against the normal policy,
and both against Triton's system shared memory, in one run, interleaved.

Three servers run side by side (the null model: the data path alone): this server as it starts by
default, the same with ``--realtime-priority 1``, and ``tritonserver`` with the peer model of
``benchmarks.peers``. Each round measures the three in turn (their order reversed every other
round), with this server's clients on the local socket (``v1-local``) and Triton's on system shared
memory (``oip-shm``). Per round: images/s, the server's and the clients' CPU per image, the cores
left idle and how long each server's main process waited for a core; then the ratios per round
and their medians. Needs root or an ``RLIMIT_RTPRIO`` of 1 (``ulimit -r``) and ``.venv-peers``.

    python -m benchmarks.realtime --clients 4 --images 8 --rounds 10 --json bench-out/realtime-4x8.json
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import oip, peers, servers

WAYS = ("normal", "triton", "realtime")  # the order of a round; every other round backwards


def main(
    clients: Annotated[int, typer.Option(help="Client processes.")] = 4,
    images: Annotated[int, typer.Option(help="Images per request.")] = 8,
    rounds: Annotated[int, typer.Option(help="Rounds; each measures the three servers once.")] = 10,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 5.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """This server at the normal policy and at SCHED_FIFO, and Triton, interleaved."""
    models = servers.REPO_ROOT / "engines" / "models"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        paths = servers.scene_files(Path(tmp))
        running = {
            "normal": stack.enter_context(servers.grpc_server(models, workers=2, batch_size=8, null_model=True)),
            "realtime": stack.enter_context(servers.grpc_server(
                models, workers=2, batch_size=8, null_model=True, extra=["--realtime-priority", "1"])),
            "triton": stack.enter_context(peers.triton(null_model=True, models=models, workers=2, batch=8)),
        }  # fmt: skip

        def measure(name: str) -> dict[str, Any]:
            way, env = ("oip-shm", peers.TRITON_CLIENT_ENV) if name == "triton" else ("v1-local", None)
            return oip._measure(way, running[name], clients, seconds, images, paths, env)

        rows = oip.back_and_forth(WAYS, rounds, measure, lambda n, row: f"round {n + 1}: " + ", ".join(
            f"{name} {row[name]['fps']:.0f} img/s (server {row[name]['server_cpu_ms_per_image']:.3f}, clients "
            f"{row[name]['clients_cpu_ms_per_image']:.3f} ms/img, {row[name]['machine_idle']:.0%} idle, main "
            f"waiting {row[name]['main_waiting']:.2f})" for name in WAYS))  # fmt: skip
    pairs = {"realtime / triton": ("realtime", "triton"), "normal / triton": ("normal", "triton"),
             "realtime / normal": ("realtime", "normal")}  # fmt: skip
    oip.pair_ratios(rows, pairs, json_out, clients=clients, images=images)


if __name__ == "__main__":
    typer.run(main)
