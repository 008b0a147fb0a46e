"""A huge image costs a worker bounded memory, and the memory goes back afterwards (docs/security.md).

The decoder keeps the buffers the largest image grew for good: without a bound, a few 40-megapixel
images left a worker at ~1 GB resident for the rest of its life. With ``--worker-memory-mib`` a
worker over the bound after a chunk is replaced; on cpu its data segment may also grow by at most
twice the bound beyond what loading took (a chunk that would need more is retried image by image on
a fresh worker: tests/integration/test_worker.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import cv2

from engines.scenes import generate_scene
from tests.integration.conftest import running_server

BOUND_MIB = 800  # a worker with the demo models is ~330 MiB resident; four 39-megapixel images at once ~1 GB


def resident_mib(pid: int) -> int:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    assert match is not None
    return int(match.group(1)) // 1024


def test_a_huge_image_grows_a_worker_only_until_it_is_replaced(model_repo_dir: Path) -> None:
    huge = cv2.resize(generate_scene(5, width=1280, height=720).decode_rgb(), (7200, 5400))
    huge_jpeg = cv2.imencode(".jpg", huge, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    small = generate_scene(6).jpeg
    with running_server(model_repo_dir, "--worker-memory-mib", str(BOUND_MIB), workers=1) as server:
        with server.client() as client:
            (first,) = server.worker_pids()
            client.detect([small] * 4)
            results = client.detect([huge_jpeg] * 4)  # one chunk: ~1 GB to decode at once
            assert [(r.code.name, r.width, r.height) for r in results] == [("OK", 7200, 5400)] * 4
            assert [r.detections != () for r in results] == [True] * 4
            for _ in range(3):
                assert all(r.ok for r in client.detect([small] * 4))
            # The worker retired right after answering them: the small batches ran on its replacement.
            (now,) = server.worker_pids()
            assert now != first, "the worker that decoded them was replaced"
            assert resident_mib(now) < BOUND_MIB
        log = server.log()
        assert "retiring to give it back" in log or "std::bad_alloc" in log


def test_a_bound_the_worker_is_over_with_its_models_loaded_fails_the_start(
    model_repo_dir: Path, tmp_path: Path
) -> None:
    """Else the worker would retire after every chunk, paying a model load each time."""
    cmd = [sys.executable, "-m", "infer_server", "serve", "--models", str(model_repo_dir), "--port", "0",
           "--shm-dir", str(tmp_path / "shm"), "--workers", "1", "--worker-memory-mib", "256"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1
    assert "over --worker-memory-mib 256: raise it" in done.stderr
