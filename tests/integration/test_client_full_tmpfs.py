"""The client library on a tmpfs that fills up: a clear error, never SIGBUS (needs a mount namespace)."""

from __future__ import annotations

import errno
from pathlib import Path

from tests.helpers import on_small_tmpfs

_FULL_TMPFS = """
import os, sys
from infer_client._protocol import BatchFiles
files = BatchFiles(sys.argv[1])
path, _ = files.write([b"a" * 300_000])
files.recycle(path)
with open(os.path.join(sys.argv[1], "filler"), "wb") as f:  # fill the file system
    try:
        while True:
            f.write(b"f" * 65536)
            f.flush()
    except OSError:
        pass
try:
    files.write([b"b" * 1_500_000])  # more pages than are left: must fail, not fault
except OSError as exc:
    print("refused", exc.errno)
"""


def test_a_full_file_system_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A copy into a mapped file faults its pages in; on a full tmpfs that would be SIGBUS."""
    proc = on_small_tmpfs(tmp_path, _FULL_TMPFS)
    assert proc.returncode == 0, proc.returncode  # SIGBUS: -7 / 135
    assert proc.stdout.split() == ["refused", str(errno.ENOSPC)]


_FALLBACK = """
import logging, os, subprocess, sys, tempfile
from engines.scenes import generate_scene
from infer_client import InferClient
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
shm, models = sys.argv[1], sys.argv[2]
staging = tempfile.mkdtemp()  # on disk: the server stages inline batches off the full tmpfs
cmd = [sys.executable, "-m", "infer_server", "serve", "--null-model", "--models", models, "--port", "0",
       "--shm-dir", shm + "/infer", "--staging-dir", staging + "/staging", "--workers", "1"]
server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    port = next(line for line in server.stdout if line.startswith("listening on")).rsplit(":", 1)[1].strip()
    jpeg = generate_scene(3, width=320, height=240).jpeg
    with InferClient("127.0.0.1:" + port, shm_dir=shm + "/infer") as client:
        before = [r.ok for r in client.detect([jpeg])]
        with open(shm + "/filler", "wb") as f:  # someone else fills the file system
            try:
                while True:
                    f.write(b"f" * 65536)
                    f.flush()
            except OSError:
                pass
        after = [r.ok for r in client.detect([jpeg] * 3)] + [r.ok for r in client.detect([jpeg])]
        print("results", before, after, "fallbacks", client.inline_fallbacks)
finally:
    server.terminate()
    print("server exit", server.wait(60))
"""


def test_a_full_tmpfs_makes_the_client_send_inline_and_say_so(tmp_path: Path, model_repo_dir: Path) -> None:
    """The client degrades to inline bytes instead of failing the call, once per push, said once."""
    proc = on_small_tmpfs(tmp_path, _FALLBACK.replace("sys.argv[2]", repr(str(model_repo_dir))), "size=4m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "results [True] [True, True, True, True] fallbacks 2" in lines, proc.stdout
    assert sum("is full" in line for line in lines) == 1, "said once"
    assert "server exit 0" in lines


_SPILL = """
import os, socket, subprocess, sys, tempfile, urllib.request
from engines.scenes import generate_scene
from infer_client import InferClient
shm, models = sys.argv[1], sys.argv[2]
spill = tempfile.mkdtemp() + "/spill"
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    metrics = s.getsockname()[1]
cmd = [sys.executable, "-m", "infer_server", "serve", "--null-model", "--models", models, "--port", "0",
       "--shm-dir", shm + "/infer", "--spill-dir", spill, "--spill-at", "0.5", "--workers", "1",
       "--metrics-port", str(metrics)]
server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    port = next(line for line in server.stdout if line.startswith("listening on")).rsplit(":", 1)[1].strip()
    with open(shm + "/filler", "wb") as f:  # someone else fills the tmpfs
        try:
            while True:
                f.write(b"f" * 65536)
                f.flush()
        except OSError:
            pass
    jpeg = generate_scene(4, width=320, height=240).jpeg
    with InferClient("127.0.0.1:" + port, transport="inline") as client:
        oks = [r.ok for _ in range(5) for r in client.detect([jpeg] * 3)]
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics").read().decode()
    spills = [line for line in text.splitlines() if line.startswith("infer_staging_spills_total")]
    print("results", sum(oks), len(oks), spills[0].split()[1])
finally:
    server.terminate()
    print("server exit", server.wait(60), "spill left", os.path.exists(spill))
"""


def test_staging_spills_to_disk_when_the_tmpfs_is_full(tmp_path: Path, model_repo_dir: Path) -> None:
    """Inline batches are staged on disk while the tmpfs is over --spill-at (here: full): the server
    keeps answering, and nothing is left behind after it stops."""
    proc = on_small_tmpfs(tmp_path, _SPILL.replace("sys.argv[2]", repr(str(model_repo_dir))), "size=4m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "results 15 15 5.0" in proc.stdout, proc.stdout
    assert "server exit 0 spill left False" in proc.stdout
