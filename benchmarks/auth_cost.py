"""What authentication costs a call that carries one small push: front CPU per PushData, tokens off vs on.

``benchmarks.ab --b-args=--tokens`` measures the fps point, whose clients push on one Session
stream each, so the token there is checked once per stream. This measures the other extreme: one
unary ``PushData`` per image, each carrying the token through the gate (checked before the request
is read). Two null-model servers run side by side, one with a tokens file; rounds alternate
between them (order flipped each round) and report the front's CPU per push of each and their
ratio::

    .venv/bin/python -m benchmarks.auth_cost --rounds 6 --pushes 2000
"""

from __future__ import annotations

import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated

import grpc
import typer

from benchmarks import servers
from benchmarks.servers import ServerProcess, cpu_seconds
from engines.scenes import generate_scene
from infer_proto import infer_pb2, infer_pb2_grpc

MODELS = servers.REPO_ROOT / "engines" / "models"


def _round(server: ServerProcess, metadata: tuple[tuple[str, str], ...] | None, request: infer_pb2.PushDataRequest,
           pushes: int) -> float:  # fmt: skip
    """Front CPU milliseconds per push over ``pushes`` sequential unary pushes."""
    with grpc.insecure_channel(server.address) as channel:
        stub = infer_pb2_grpc.InferenceServiceStub(channel)
        stub.PushData(request, metadata=metadata)  # connected and warm
        before = cpu_seconds(server.process.pid)
        for _ in range(pushes):
            stub.PushData(request, metadata=metadata)
        return (cpu_seconds(server.process.pid) - before) * 1000 / pushes


def main(
    rounds: Annotated[int, typer.Option(help="Pairs of runs.")] = 6,
    pushes: Annotated[int, typer.Option(help="Pushes per run.")] = 2000,
) -> None:
    """Alternate the two servers; print each round's front CPU per push and the on/off ratio."""
    jpeg = generate_scene(5, width=320, height=240).jpeg
    request = infer_pb2.PushDataRequest(data=jpeg, sizes=[len(jpeg)])
    token = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        tokens.write_text(f"bench {token}\n")
        tokens.chmod(0o600)
        base = ["infer_server", "serve", "--models", str(MODELS), "--host", "127.0.0.1", "--port", "0", "--null-model",
                "--workers", "1", "--log-level", "WARNING", "--result-ttl", "5"]  # fmt: skip
        with (
            servers.launched("grpc", base, shm=True, label="off") as off,
            servers.launched("grpc", [*base, "--tokens-file", str(tokens)], shm=True, label="on") as on,
        ):
            sides = {"off": (off, None), "on": (on, (("authorization", f"Bearer {token}"),))}
            results: dict[str, list[float]] = {"off": [], "on": []}
            for n in range(1, rounds + 1):
                for label in ("off", "on") if n % 2 else ("on", "off"):
                    server, metadata = sides[label]
                    results[label].append(_round(server, metadata, request, pushes))
                    time.sleep(1.0)
                a, b = results["off"][-1], results["on"][-1]
                print(f"round {n}: front CPU ms/push off {a:.3f}  on {b:.3f}  on/off {b / a:.3f}")
    ratios = [b / a for a, b in zip(results["off"], results["on"], strict=True)]
    off, on = statistics.mean(results["off"]), statistics.mean(results["on"])
    print(f"off: mean {off:.3f} ms/push; on: mean {on:.3f} ms/push")
    print(f"on/off: mean {statistics.mean(ratios):.3f}, rounds {' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    typer.run(main)
