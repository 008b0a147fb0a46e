"""Client and server on a tmpfs that fills up (a fresh small tmpfs in a mount namespace): a clear
error and never SIGBUS, the client falling back to inline bytes, the server spilling to disk."""

from __future__ import annotations

import errno
from pathlib import Path

from tests.helpers import on_small_tmpfs

# Shared by the scripts below: fill the file system from outside, and start a server on it.
_PRELUDE = """
import logging, os, socket, subprocess, sys, tempfile, urllib.request
shm = sys.argv[1]

def fill():
    with open(os.path.join(shm, "filler"), "wb") as f:  # someone else fills the file system
        try:
            while True:
                f.write(b"f" * 65536)
                f.flush()
        except OSError:
            pass

def metrics_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def metric(port, name):  # summed over its labels
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    return sum(float(line.split()[1]) for line in text.splitlines() if line.split("{")[0].split()[0] == name)

def start_server(*args, null=True):
    cmd = [sys.executable, "-m", "infer_server", "serve", *(["--null-model"] if null else []), "--models", MODELS,
           "--port", "0", "--shm-dir", shm + "/infer", "--workers", "1", *args]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = next(line for line in server.stdout if line.startswith("listening on")).rsplit(":", 1)[1].strip()
    return server, "127.0.0.1:" + port
"""


def run(tmp_path: Path, script: str, models: Path | None = None) -> str:
    prelude = _PRELUDE.replace("MODELS", repr(str(models)))
    proc = on_small_tmpfs(tmp_path, prelude + script, "size=4m")
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # SIGBUS: -7 / 135
    return proc.stdout


_FULL_TMPFS = """
from infer_client._protocol import BatchFiles
files = BatchFiles(shm)
path, _ = files.write([b"a" * 300_000])
files.recycle(path)
fill()
try:
    files.write([b"b" * 1_500_000])  # more pages than are left: must fail, not fault
except OSError as exc:
    print("refused", exc.errno)
"""


def test_a_full_file_system_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A copy into a mapped file faults its pages in; on a full tmpfs that would be SIGBUS."""
    assert run(tmp_path, _FULL_TMPFS).split() == ["refused", str(errno.ENOSPC)]


_FALLBACK = """
from engines.scenes import generate_scene
from infer_client import InferClient
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="%(levelname)s %(message)s")
# The staging directory on disk: the server stages inline batches off the full tmpfs.
server, address = start_server("--staging-dir", tempfile.mkdtemp() + "/staging")
try:
    jpeg = generate_scene(3, width=320, height=240).jpeg
    with InferClient(address, shm_dir=shm + "/infer") as client:
        before = [r.ok for r in client.detect([jpeg])]
        fill()
        after = [r.ok for r in client.detect([jpeg] * 3)] + [r.ok for r in client.detect([jpeg])]
        print("results", before, after, "fallbacks", client.inline_fallbacks)
finally:
    server.terminate()
    print("server exit", server.wait(60))
"""


def test_a_full_tmpfs_makes_the_client_send_inline_and_say_so(tmp_path: Path, model_repo_dir: Path) -> None:
    """The client degrades to inline bytes instead of failing the call, once per push, said once."""
    lines = run(tmp_path, _FALLBACK, model_repo_dir).splitlines()
    assert "results [True] [True, True, True, True] fallbacks 2" in lines, lines
    assert sum("is full" in line for line in lines) == 1, "said once"
    assert "server exit 0" in lines


_SPILL = """
from engines.scenes import generate_scene
from infer_client import InferClient
spill, metrics = tempfile.mkdtemp() + "/spill", metrics_port()
server, address = start_server("--spill-dir", spill, "--spill-at", "0.5", "--metrics-port", str(metrics))
try:
    fill()
    jpeg = generate_scene(4, width=320, height=240).jpeg
    with InferClient(address, transport="inline") as client:
        oks = [r.ok for _ in range(5) for r in client.detect([jpeg] * 3)]
    print("results", sum(oks), len(oks), metric(metrics, "infer_staging_spills_total"))
finally:
    server.terminate()
    print("server exit", server.wait(60), "spill left", os.path.exists(spill))
"""


def test_staging_spills_to_disk_when_the_tmpfs_is_full(tmp_path: Path, model_repo_dir: Path) -> None:
    """Inline batches are staged on disk while the tmpfs is over --spill-at (here: full): the server
    keeps answering, and nothing is left behind after it stops."""
    stdout = run(tmp_path, _SPILL, model_repo_dir)
    assert "results 15 15 5.0" in stdout, stdout
    assert "server exit 0 spill left False" in stdout


_DEMOTE = """
from engines.scenes import generate_scene
from infer_client import InferClient
spill, metrics = tempfile.mkdtemp() + "/spill", metrics_port()
server, address = start_server("--spill-dir", spill, "--spill-at", "0.6", "--upkeep-interval-s", "0.05",
                               "--metrics-port", str(metrics), null=False)

try:
    jpegs = [generate_scene(seed, width=320, height=240).jpeg for seed in range(8)]
    with InferClient(address, transport="inline") as client:
        client.wait_ready()
        ids = [client.push(jpegs) for _ in range(6)]  # 48 images: the one worker holds 2 chunks of 8
        staged = metric(metrics, "infer_staged_bytes")
        fill()  # the tmpfs is full now: what waits in it should move to disk
        ids += [client.push(jpegs) for _ in range(2)]  # and pushes go on: staged on disk at once
        results = list(client.pull(ids, timeout=120))
        keys = {(r.batch_id, r.index) for r in results}
        print("answered", len(results), len(keys), all(r.ok for r in results), "staged before", staged > 0)
        with open(f"/proc/{server.pid}/status") as f:
            peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) // 1024
        print("front peak MiB", peak, "bounded", peak < 200)
        demoted = metric(metrics, "infer_staging_demotions_total") > 0
        print("demoted", demoted, "left", metric(metrics, "infer_staged_bytes"))
finally:
    server.terminate()
    print("server exit", server.wait(60), "spill left", os.path.exists(spill))
"""


def test_waiting_batches_move_to_disk_when_the_tmpfs_fills(tmp_path: Path, model_repo_dir: Path) -> None:
    """Inline batches staged in tmpfs and still waiting for a worker move to the disk tier when the
    tmpfs goes over --spill-at under them, and pushes go on: every image is answered once, the
    front's memory stays bounded, nothing stays behind."""
    stdout = run(tmp_path, _DEMOTE, model_repo_dir)
    assert "answered 64 64 True staged before True" in stdout, stdout
    assert "bounded True" in stdout, stdout
    assert "demoted True left 0.0" in stdout, stdout
    assert "server exit 0 spill left False" in stdout
