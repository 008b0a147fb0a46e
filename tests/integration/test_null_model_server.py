"""A server started with ``--null-model`` answers every image from its header, through the real path."""

from __future__ import annotations

from pathlib import Path

import grpc

from engines.scenes import generate_scene
from tests.integration.conftest import running_server


def test_null_model_server_reads_every_image_and_runs_no_model(model_repo_dir: Path) -> None:
    scenes = [generate_scene(seed, width=1280, height=720) for seed in (31, 32, 33)]
    blobs = [scenes[0].jpeg, b"not an image", scenes[1].jpeg, scenes[2].jpeg]
    with running_server(model_repo_dir, "--null-model") as server:
        for transport in ("tmpfs", "inline"):
            with server.client(transport=transport) as client:
                results = client.detect(blobs, names=["a", "b", "c", "d"])
            assert [(r.index, r.name, r.code) for r in results] == [
                (0, "a", grpc.StatusCode.OK),
                (1, "b", grpc.StatusCode.INVALID_ARGUMENT),
                (2, "c", grpc.StatusCode.OK),
                (3, "d", grpc.StatusCode.OK),
            ]
            ok = [r for r in results if r.ok]
            assert all((r.width, r.height, r.detections) == (1280, 720, ()) for r in ok)
            assert all(set(r.timings_ms) == {"read", "queue"} for r in ok)
