"""Peak memory of a worker on the largest image the server allows (``--max-image-pixels``).

Starts a server with the embedded models and one worker, reads the worker's peak resident memory
(``VmHWM``) after warm-up, pushes one JPEG of just under the pixel limit (a generated scene scaled
up, quality 90) and reads it again; then ten ordinary 1280×720 scenes, to show what stays::

    .venv/bin/python -m benchmarks.large_image            # ~1 min
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import cv2
import typer

from benchmarks import servers
from benchmarks.procs import descendants
from engines.scenes import generate_scene
from infer_client import InferClient

MODELS = servers.REPO_ROOT / "engines" / "models"


def _status_mib(pid: int, key: str) -> int:
    return servers.status_kib(pid, key) // 1024


def main(pixels: Annotated[int, typer.Option(help="The server's --max-image-pixels.")] = 40_000_000) -> None:
    """Print the worker's peak and resident memory before and after the largest allowed image."""
    width = int(math.sqrt(pixels * 4 / 3)) // 16 * 16
    height = pixels // width // 16 * 16
    scene = generate_scene(11, width=1280, height=720).decode_rgb()
    big = cv2.imencode(".jpg", cv2.resize(scene, (width, height)), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    small = [generate_scene(seed, width=1280, height=720).jpeg for seed in range(12, 22)]
    args = ["infer_server", "serve", "--models", str(MODELS), "--host", "127.0.0.1", "--port", "0", "--workers", "1",
            "--max-image-pixels", str(pixels), "--worker-memory-mib", "0", "--log-level", "WARNING"]  # fmt: skip
    with servers.launched("grpc", args, shm=True, label="large") as server:
        (worker,) = [
            p for p in descendants(server.process.pid) if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        with InferClient(server.address, shm_dir=server.shm_dir, transport="tmpfs") as client:
            client.detect(small[:1])
            rows = [("warm (one 1280x720 scene)", _status_mib(worker, "VmHWM"), _status_mib(worker, "VmRSS"))]
            (result,) = client.detect([big])
            assert result.ok, result.message
            rows.append((f"one {width}x{height} JPEG ({len(big) / 1e6:.1f} MB, {width * height / 1e6:.1f} MP)",
                         _status_mib(worker, "VmHWM"), _status_mib(worker, "VmRSS")))  # fmt: skip
            client.detect(small)
            rows.append(("then ten 1280x720 scenes", _status_mib(worker, "VmHWM"), _status_mib(worker, "VmRSS")))
    print(f"{'worker after':60} {'peak MiB':>9} {'resident MiB':>13}")
    for what, peak, resident in rows:
        print(f"{what:60} {peak:9d} {resident:13d}")


if __name__ == "__main__":
    typer.run(main)
