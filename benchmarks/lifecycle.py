"""What the model lifecycle costs the answered path: the drift watch's bookkeeping, and a shadow
candidate at its default sampling, measured in one run, interleaved.

Three servers with the embedded models (the color model as versions 1 and 2 of one ONNX file, so
the shadow candidate costs what the serving model costs) run side by side, one loaded at a time:

* ``base`` — no drift watch (``--drift-window 0``), no trial;
* ``drift`` — the drift watch at its defaults (the server's default configuration);
* ``shadow`` — the drift watch and color version 1 shadowing version 2 on 10% of the batches
  (the CLI's default share) within the default budget (``--shadow-budget 0.1``).

Each round runs every server in turn (the order rotates round to round) for ``--seconds`` with
``--clients`` clients pushing batches of 8: images/s and the front's CPU per image (the drift
watch runs there) per server, and the ratios to ``base`` from the same round.

    .venv/bin/python -m benchmarks.lifecycle --rounds 3 --json bench-out/lifecycle.json
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from benchmarks import servers
from engines.scenes import generate_scene
from infer_client import InferClient

MODELS = servers.REPO_ROOT / "engines" / "models"
BATCH = 8


def _repository(root: Path) -> Path:
    """The embedded repository with color as versions 1 and 2 (the same file), version 2 serving."""
    for model in ("detector", "vehicle_type"):
        (root / model).symlink_to(MODELS / model)
    config = yaml.safe_load((MODELS / "color" / "config.yaml").read_text())
    config.pop("version", None)
    config["version_policy"] = {"specific": ["2"]}
    (root / "color").mkdir()
    (root / "color" / "config.yaml").write_text(yaml.safe_dump(config))
    for version in ("1", "2"):
        (root / "color" / version).mkdir()
        (root / "color" / version / "model.onnx").symlink_to(MODELS / "color" / "model.onnx")
    return root


def _server(repo: Path, label: str, *extra: str) -> contextlib.AbstractContextManager[servers.ServerProcess]:
    args = ["infer_server", "serve", "--models", str(repo), "--host", "127.0.0.1", "--port", "0",
            "--workers", "2", "--batch-size", str(BATCH), "--log-level", "WARNING", *extra]  # fmt: skip
    return servers.launched("grpc", args, shm=True, label=label)


def _measure(server: servers.ServerProcess, images: list[bytes], clients: int, seconds: float) -> dict[str, float]:
    """Images/s with ``clients`` clients pushing batches for ``seconds``, and front CPU ms per image."""
    done = [0] * clients
    stop = threading.Event()

    def push(n: int) -> None:
        with InferClient(server.address, shm_dir=server.shm_dir, transport="tmpfs") as client:
            i = n
            while not stop.is_set():
                batch = [images[(i + k) % len(images)] for k in range(BATCH)]
                done[n] += sum(r.ok for r in client.detect(batch))
                i += BATCH * clients

    threads = [threading.Thread(target=push, args=(n,)) for n in range(clients)]
    front0, _ = server.cpu()
    started = time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    front1, _ = server.cpu()
    answered = sum(done)
    return {"fps": answered / elapsed, "front_ms_per_image": 1e3 * (front1 - front0) / max(1, answered)}


def drift_microseconds(images: int = 20_000) -> float:
    """The drift watch's CPU per answered image on the front's loop (``DriftMonitor.observe``), in µs:
    an image with 6 detections, each with 2 attributes, against the shipped profile."""
    from infer_server.front.drift import DriftMonitor
    from infer_server.messages import AttributeRecord, Box, DetectionRecord, ImageOutcome

    attributes = (AttributeRecord("color", "red", 0.9), AttributeRecord("vehicle_type", "suv", 0.8))
    detections = tuple(DetectionRecord(0, "car", 0.5 + i / 20, Box(0, 0, 9, 9), attributes) for i in range(6))
    outcome = ImageOutcome("b", 0, "x", width=1280, height=720, detections=detections, input_stats=(110.0, 45.0))
    monitor = DriftMonitor(500)
    monitor.use((MODELS / "detector" / "profile.json").read_text(), ("detector", "1"))
    started = time.process_time()
    for _ in range(images):
        monitor.observe(outcome)
    return 1e6 * (time.process_time() - started) / images


def main(
    rounds: Annotated[int, typer.Option(help="Rounds; each runs every server once.")] = 3,
    seconds: Annotated[float, typer.Option(help="Seconds per measurement.")] = 20.0,
    clients: Annotated[int, typer.Option(help="Clients pushing batches at once.")] = 4,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Measure the drift watch's and a shadow candidate's cost against a server with neither."""
    images = [generate_scene(seed, width=640, height=480).jpeg for seed in range(30_000, 30_064)]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = _repository(Path(tmp))
        with (
            _server(repo, "base", "--drift-window", "0") as base,
            _server(repo, "drift") as drift,
            _server(repo, "shadow", "--shadow-budget", "0.1") as shadow,
        ):
            with InferClient(shadow.address, transport="inline") as admin:
                admin.models.shadow("color", "1", 0.1)
            sides = {"base": base, "drift": drift, "shadow": shadow}
            for n in range(rounds):
                order = list(sides)[n % 3 :] + list(sides)[: n % 3]
                row = {label: _measure(sides[label], images, clients, seconds) for label in order}
                for label in ("drift", "shadow"):
                    row[label]["ratio"] = row[label]["fps"] / row["base"]["fps"]
                rows.append(row)
                said = [f"{k} {v['fps']:.1f} img/s ({v['front_ms_per_image']:.2f} ms front)" for k, v in row.items()]
                print(f"round {n + 1}: " + ", ".join(said))
            with InferClient(shadow.address, transport="inline") as admin:
                trial = [m for m in admin.models.list() if m.name == "color"][0]
    summary = {label: statistics.median(r[label]["ratio"] for r in rows) for label in ("drift", "shadow")}
    observe_us = drift_microseconds()
    print(f"drift watch: {observe_us:.1f} µs of front CPU per answered image (DriftMonitor.observe)")
    print(f"median throughput vs base: drift watch {summary['drift']:.3f}, shadow 10% {summary['shadow']:.3f}")
    print(f"shadow compared {trial.shadow_images} images, skipped {trial.shadow_skipped} chunks over the budget")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"rounds": rows, "median_ratio": summary, "clients": clients, "seconds": seconds, "batch": BATCH,
               "shadow_images": trial.shadow_images, "shadow_skipped": trial.shadow_skipped,
               "drift_observe_us": observe_us}  # fmt: skip
        json_out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    typer.run(main)
