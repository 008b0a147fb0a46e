"""A server's short life, scraped every second, and the dashboard's panels drawn from it
(``benchmarks.dashboard``; matplotlib, from the ``bench`` extra).

The life: two clients push batches of 4 held-out scenes (default and varied style in turn, the
reference profile's mix) all along; after 30 s color version 1 becomes a
canary on 30% of the batches; after 60 s the canary ends and version 1 shadows version 2 on half
the batches; after 90 s the scenes turn darker (pixels × 0.5), which the drift watch (here a
window of 200 images, judged every 2 s) should flag; it ends at 130 s. Rates in the picture are
over 20 s (Grafana's panels use 1 m).
"""

from __future__ import annotations

import contextlib
import socket
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np

from benchmarks import dashboard, servers
from benchmarks.dashboard import PANELS, Sample, parse
from benchmarks.lifecycle import _repository
from engines import scenes_varied
from engines.scenes import generate_scene
from infer_client import InferClient

PHASES = ((30, "canary"), (60, "shadow"), (90, "dark"), (130, "end"))


def _darker(jpeg: bytes) -> bytes:
    pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", (pixels * 0.5).astype(np.uint8))[1].tobytes()


def record() -> list[tuple[float, Sample]]:
    """Run the life above; every scrape as (seconds since start, sample)."""
    # The mix the reference profile was computed on (default and varied style in turn): the drift
    # panel stays low until the scenes turn darker.
    normal = [(generate_scene if i % 2 == 0 else scenes_varied.generate_scene)(640_000 + i).jpeg for i in range(128)]
    dark = [_darker(j) for j in normal]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    series: list[tuple[float, Sample]] = []
    stop, images = threading.Event(), [normal]
    with tempfile.TemporaryDirectory() as tmp:
        args = ["infer_server", "serve", "--models", str(_repository(Path(tmp))), "--host", "127.0.0.1",
                "--port", "0", "--workers", "2", "--batch-size", "4", "--log-level", "WARNING",
                "--metrics-port", str(port), "--drift-window", "200", "--drift-min-images", "100",
                "--drift-interval-s", "2"]  # fmt: skip
        with servers.launched("grpc", args, shm=True, label="dashboard") as server:
            start = time.monotonic()

            def push(n: int) -> None:
                with InferClient(server.address, shm_dir=server.shm_dir) as client:
                    i = n
                    while not stop.is_set():
                        client.detect([images[0][(i + k) % len(normal)] for k in range(4)])
                        i += 8

            def scrape() -> None:
                while not stop.wait(1.0):
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
                    series.append((time.monotonic() - start, parse(text)))

            threads = [threading.Thread(target=push, args=(n,)) for n in range(2)] + [threading.Thread(target=scrape)]
            for t in threads:
                t.start()
            with InferClient(server.address, transport="inline") as admin:
                for at, phase in PHASES:
                    time.sleep(max(0.0, at - (time.monotonic() - start)))
                    if phase == "canary":
                        admin.models.canary("color", "1", 0.3)
                    elif phase == "shadow":
                        admin.models.canary("color", "1", 0.0)
                        admin.models.shadow("color", "1", 0.5)
                    elif phase == "dark":
                        images[0] = dark
            stop.set()
            for t in threads:
                t.join()
    return series


def render(series: list[tuple[float, Sample]], out: Path) -> None:
    """Draw every panel of the dashboard from ``series`` into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard.RATE_WINDOW_S = 20
    rows = (len(PANELS) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(13, 2.6 * rows), sharex=True)
    times = [t for t, _ in series]
    for ax, panel in zip(axes.flat, PANELS, strict=False):
        for query in panel.queries:
            lines: dict[tuple[str, ...], list[float]] = {}
            for i in range(len(series)):
                for key, value in query.evaluate(series, i).items():
                    lines.setdefault(key, [float("nan")] * len(series))[i] = value
            for key, values in sorted(lines.items()):
                if not any(v for v in values if v == v):
                    continue  # a series that stayed at zero (every status code is exported) says nothing
                ax.plot(times, values, label=" ".join(key) or query.legend or panel.title, linewidth=1.2)
        for at, phase in PHASES[:-1]:
            ax.axvline(at, color="grey", linewidth=0.6, linestyle=":")
            ax.text(at, 1.0, f" {phase}", transform=ax.get_xaxis_transform(), fontsize=7, color="grey", va="top")
        ax.set_title(panel.title, fontsize=9)
        ax.tick_params(labelsize=7)
        with contextlib.suppress(ValueError):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=6, loc="upper left", ncol=2)
    for ax in axes.flat[len(PANELS) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=8)
    fig.suptitle("infer-server dashboard (deploy/grafana/infer-server.json), drawn from a recorded run", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
