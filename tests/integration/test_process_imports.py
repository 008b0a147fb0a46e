"""The server's processes never load stage code: the rule ``tests/unit/test_boundaries.py`` checks
statically, checked here in a fresh interpreter, transitively."""

from __future__ import annotations

import subprocess
import sys

import pytest

VISION = ("numpy", "cv2", "nvidia", "onnxruntime", "tensorrt")


@pytest.mark.parametrize(
    ("modules", "forbidden"),
    [
        ("infer_server.cli, infer_server.front.server", ("infer_server.stage", *VISION)),
        ("infer_server.relay.process",
         ("infer_server.stage", "infer_server.supervisor", "infer_server.front.server", *VISION)),
    ],
    ids=["main process", "front process"],
)  # fmt: skip
def test_a_server_process_loads_no_stage_code_and_no_vision_library(modules: str, forbidden: tuple[str, ...]) -> None:
    """What the main process (front and supervisor) and a front process (``--fronts``) import,
    transitively, in a fresh interpreter."""
    probe = f"import sys, {modules}\nprint('\\n'.join(m for m in sys.modules if m.startswith({forbidden!r})))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
