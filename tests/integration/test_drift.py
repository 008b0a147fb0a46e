"""The drift watch on a real server: quiet on held-out scenes of the training distribution, a flag
on a darker stream (the rates over many windows are measured by benchmarks/drift.py)."""

from __future__ import annotations

import cv2
import numpy as np

from engines import scenes, scenes_varied
from infer_client import InferClient
from tests.helpers import MODELS
from tests.integration.conftest import running_server

WINDOW = 150


def held_out(i: int) -> bytes:
    """Default and varied style in turn (the reference's mix); seeds no recipe step uses."""
    scene = scenes.generate_scene(920_000 + i) if i % 2 == 0 else scenes_varied.generate_scene(630_000 + i)
    return scene.jpeg


def darker(jpeg: bytes) -> bytes:
    pixels = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    return cv2.imencode(".jpg", (pixels * 0.5).astype(np.uint8))[1].tobytes()


def push_all(client: InferClient, jpegs: list[bytes]) -> None:
    ids = [client.push(jpegs[lo : lo + 8]) for lo in range(0, len(jpegs), 8)]
    assert all(r.ok for r in client.pull(ids))


def test_quiet_on_held_out_scenes_and_a_flag_on_a_darker_stream() -> None:
    args = ("--drift-window", str(WINDOW), "--drift-min-images", str(WINDOW), "--drift-interval-s", "0.1")
    with running_server(MODELS, *args, workers=2) as server, server.client() as client:
        images = [held_out(i) for i in range(WINDOW)]
        push_all(client, images)
        for i in range(500):  # each answer is a wait: the window is judged every 0.1 s
            report = client.models.drift()
            if report.statistics:
                break
            push_all(client, [images[i % WINDOW]])
        assert report.enabled and report.model == "detector" and "validation scenes" in report.reference
        assert report.window_images == WINDOW and not report.flagged, report.statistics
        push_all(client, [darker(j) for j in images])
        for i in range(500):
            report = client.models.drift()
            if report.statistics["brightness"][1]:
                break
            push_all(client, [darker(images[i % WINDOW])])
        assert report.flagged and report.statistics["brightness"][1], report.statistics
        assert report.statistics["brightness"][0] > 1.0
        assert '"event":"drift","statistic":"brightness"' in server.log_path.read_text()
