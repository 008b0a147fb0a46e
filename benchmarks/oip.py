"""The Open Inference Protocol's data path beside infer.v1's, in one run, interleaved: the same
null-model server, the same workload (``--clients`` client processes, ``--batch`` images per
request), four ways in:

* ``v1-tmpfs`` / ``v1-inline`` — the server's own client library (``infer_client``);
* ``oip-inline`` / ``oip-shm`` — tritonclient, unmodified, from its own environment (``.venv-triton``),
  inline bytes and system shared memory.

images/s and the server's CPU per image (front + workers) per way, and each way's ratio to
``v1-tmpfs`` from the same round. ``benchmarks.perf_analyzer`` runs Triton's own load tool beside
these ways.

    .venv/bin/python -m benchmarks.oip --rounds 3 --json bench-out/oip.json
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import servers

# The code the v1 clients run: the server's own, wherever it is imported from (``benchmarks.ab``
# puts a revision's ``src`` first on PYTHONPATH, so both sides of an A/B are that revision's).
_CODE = Path(importlib.util.find_spec("infer_client").origin).parents[1]  # type: ignore[arg-type,union-attr]

HERE = Path(__file__).resolve().parent
TRITON_PYTHON = servers.REPO_ROOT / ".venv-triton" / "bin" / "python"
WAYS = ("v1-tmpfs", "v1-inline", "v1-local", "v1-local-inline", "oip-inline", "oip-shm")


def _clients(way: str, server: servers.ServerProcess, clients: int, seconds: float, batch: int,
             images: list[str], env: dict[str, str] | None = None) -> list[subprocess.Popen[str]]:  # fmt: skip
    if way.startswith("v1"):
        local = {"v1-local": "local", "v1-local-inline": "local-inline"}.get(way)  # the session on the local socket
        transport = f"{local}:{server.local_socket}" if local else way.split("-")[1]
        cmd = [sys.executable, str(HERE / "oip_clients" / "v1_load.py"), server.address, str(server.shm_dir),
               transport, str(seconds), str(batch), *images]  # fmt: skip
    else:
        cmd = [str(TRITON_PYTHON), str(HERE / "oip_clients" / "triton_load.py"), server.address, way.split("-")[1],
               str(seconds), str(batch), *images]  # fmt: skip
    env = {"PYTHONPATH": str(_CODE), **(env or {})}
    return [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(clients)]  # fmt: skip


def run_clients(way: str, server: servers.ServerProcess, clients: int, seconds: float, batch: int,
                images: list[str], env: dict[str, str] | None = None, during: dict[str, float] | None = None,
                ) -> tuple[int, tuple[float, ...], tuple[float, ...]]:  # fmt: skip
    """Start ``clients`` load clients of ``way``, wait until every one is up (it sent a first
    request), let them all go at once for ``seconds``; the images answered, and the server's CPU
    seconds by role (``ServerProcess.cpu_by_role``) before and after. ``during`` gets, from the go
    to the last client's end, ``machine_idle``: the share of the machine's cores left idle, and
    ``main_waiting``: the seconds the server's main process (its threads together) was ready to
    run but waited for a core, per second, and ``clients_cpu``: the CPU seconds the clients spent
    (each measures its own, from the go)."""
    procs = _clients(way, server, clients, seconds, batch, images, env)
    try:
        deadline = time.monotonic() + 120
        for p in procs:
            assert p.stdout is not None and p.stdin is not None
            ready = select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]
            if not ready or p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a {way} load client did not start within 120 s")
        before = server.cpu_by_role()
        waited = servers.runnable_wait_seconds(server.process.pid)
        busy, start = servers.machine_busy_seconds(), time.monotonic()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()  # (communicate closes it)
        said = [(p.communicate(timeout=seconds + 120)[0].split() or ["0", "0"]) for p in procs]
        elapsed = time.monotonic() - start
        answered = sum(int(done) for done, _ in said)
        if during is not None:
            cores = elapsed * (os.cpu_count() or 1)
            during["machine_idle"] = max(0.0, 1.0 - (servers.machine_busy_seconds() - busy) / cores)
            during["main_waiting"] = (servers.runnable_wait_seconds(server.process.pid) - waited) / elapsed
            during["clients_cpu"] = sum(float(cpu) for _, cpu in said)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return answered, before, server.cpu_by_role()


def _measure(way: str, server: servers.ServerProcess, clients: int, seconds: float, batch: int,
             images: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    during: dict[str, float] = {}
    answered, before, after = run_clients(way, server, clients, seconds, batch, images, env, during)
    per_image = [1e3 * (a - b) / max(1, answered) for a, b in zip(after, before, strict=True)]
    # By role: the main process (tritonserver itself), gRPC front processes, the workers (Triton's
    # Python stubs).
    roles = dict(zip(("main", "fronts", "workers"), per_image, strict=True))
    clients_ms = 1e3 * during.pop("clients_cpu") / max(1, answered)
    return {"fps": answered / seconds, "server_cpu_ms_per_image": sum(per_image),
            "server_cpu_ms_per_image_by_role": roles, "clients_cpu_ms_per_image": clients_ms, **during}


@contextlib.contextmanager
def null_server(batch: int, *extra: str, label: str = "oip", wrapper: Sequence[str] = ()
                ) -> Iterator[servers.ServerProcess]:  # fmt: skip
    """A null-model server whose shared directory is ``/dev/shm`` itself (tritonclient and
    perf_analyzer make their regions there with ``shm_open``), its staging directory a fresh one;
    ``wrapper``: as ``servers.launched``'s."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as staging:
        args = ["infer_server", "serve", "--null-model", "--models", str(servers.REPO_ROOT / "engines" / "models"),
                "--host", "127.0.0.1", "--port", "0", "--workers", "2", "--batch-size", str(batch),
                "--log-level", "WARNING", "--shm-dir", "/dev/shm", "--staging-dir", f"{staging}/s", *extra]  # fmt: skip
        with servers.launched("grpc", args, shm=False, label=label, local_socket=True, wrapper=wrapper) as server:
            server.shm_dir = Path("/dev/shm")
            try:
                yield server
            finally:  # not the launcher's to clean up: it would empty /dev/shm, everyone's
                server.shm_dir = None


def interleaved(ways: Sequence[str], rounds: int, measure: Callable[[str], dict[str, Any]],
                json_out: Path | None, **doc: Any) -> None:  # fmt: skip
    """``rounds`` rounds of every way (the order rotating), each way's ratio to ``v1-tmpfs`` of its
    round, printed; the medians; everything in ``json_out`` with ``doc``."""
    rows = []
    for n in range(rounds):
        row = {way: measure(way) for way in [*ways[n % len(ways) :], *ways[: n % len(ways)]]}
        for way in ways:
            row[way]["ratio"] = row[way]["fps"] / row["v1-tmpfs"]["fps"]
        rows.append(row)
        print(f"round {n + 1}: " + ", ".join(f"{w} {row[w]['fps']:.0f} img/s "
              f"({row[w]['server_cpu_ms_per_image']:.2f} ms)" for w in ways))  # fmt: skip
    summary = {way: statistics.median(r[way]["ratio"] for r in rows) for way in ways}
    print("median ratio to v1-tmpfs: " + ", ".join(f"{w} {summary[w]:.2f}" for w in ways))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"rounds": rows, "median_ratio": summary, **doc}, indent=1))


def back_and_forth(order: Sequence[str], rounds: int, measure: Callable[[str], dict[str, Any]],
                   line: Callable[[int, dict[str, Any]], str]) -> list[dict[str, Any]]:  # fmt: skip
    """``rounds`` rounds of every way in ``order``, the order reversed every other round (a drift
    of the VM's speed then weighs on every way alike); each round's ``line(n, row)`` printed."""
    rows = []
    for n in range(rounds):
        row = {way: measure(way) for way in (order if n % 2 == 0 else order[::-1])}
        rows.append(row)
        print(line(n, row), flush=True)
    return rows


def pair_ratios(rows: Sequence[dict[str, dict[str, Any]]], pairs: dict[str, tuple[str, str]], json_out: Path | None,
                **doc: Any) -> None:  # fmt: skip
    """Each pair's images/s ratio per round (``pairs``: name → (way, way it is divided by)) and
    their medians, printed; with ``json_out``, written there with the rounds and ``doc``."""
    ratios = {k: [r[a]["fps"] / r[b]["fps"] for r in rows] for k, (a, b) in pairs.items()}
    for k, v in ratios.items():
        print(f"{k}: median {statistics.median(v):.2f} (rounds " + " ".join(f"{x:.2f}" for x in v) + ")")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        summary = {k: statistics.median(v) for k, v in ratios.items()}
        json_out.write_text(json.dumps({**doc, "rounds": rows, "ratios": ratios, "median_ratio": summary}, indent=1))


def main(
    rounds: Annotated[int, typer.Option(help="Rounds; each runs every way once.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 10.0,
    clients: Annotated[int, typer.Option(help="Client processes.")] = 4,
    batch: Annotated[int, typer.Option(help="Images per request.")] = 8,
    ways: Annotated[str, typer.Option(help="The ways in, comma-separated (v1-tmpfs is always measured: "
                                      "the ratios are to it).")] = ",".join(WAYS),
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    server_arg: Annotated[list[str] | None, typer.Option(help="A flag for the server, e.g. --server-arg=--pin-workers "
                                                         "(repeatable).")] = None,
) -> None:
    """Measure the ways in (by default all four) on one null-model server."""
    chosen = ["v1-tmpfs", *(w for w in ways.split(",") if w and w != "v1-tmpfs")]
    if set(chosen) - set(WAYS):
        raise typer.BadParameter(f"the ways are {', '.join(WAYS)}")
    with tempfile.TemporaryDirectory() as tmp, null_server(batch, *(server_arg or ())) as server:
        images = servers.scene_files(Path(tmp))
        interleaved(chosen, rounds, lambda way: _measure(way, server, clients, seconds, batch, images), json_out,
                    clients=clients, batch=batch)  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
