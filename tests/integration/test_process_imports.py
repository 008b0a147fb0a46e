"""The server process never loads stage code: the rule ``tests/unit/test_boundaries.py`` checks
statically, checked here in a fresh interpreter, transitively."""

from __future__ import annotations

import subprocess
import sys


def test_the_server_process_loads_no_stage_code_and_no_vision_library() -> None:
    """What the front and the supervisor import, transitively, in a fresh interpreter."""
    probe = (
        "import sys, infer_server.cli, infer_server.front.server\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(('infer_server.stage', 'numpy', 'cv2', "
        "'nvidia', 'onnxruntime', 'tensorrt'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []


def test_a_front_process_loads_no_stage_code_and_no_vision_library() -> None:
    probe = (
        "import sys, infer_server.relay.process\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith(('infer_server.stage', 'infer_server.supervisor', "
        "'infer_server.front.server', 'numpy', 'cv2', 'nvidia', 'onnxruntime', 'tensorrt'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
