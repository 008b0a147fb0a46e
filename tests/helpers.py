"""Small builders shared by test folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from infer_server.messages import WorkerOptions
from infer_server.settings import ServerSettings


def worker_options(**settings: Any) -> WorkerOptions:
    """The options a server with these settings gives its workers (every other value its default)."""
    return ServerSettings(**settings).worker_options()


def on_small_tmpfs(tmp_path: Path, script: str, options: str = "size=2m") -> subprocess.CompletedProcess[str]:
    """Run the Python ``script`` with a fresh tmpfs (``options``) mounted at its ``sys.argv[1]``, in
    a mount namespace of its own; skip the test where none can be made (needs unshare and root)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    shell = f'mount -t tmpfs -o {options} tmpfs "{mnt}" && exec "$0" -c "$1" "{mnt}"'
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, sys.executable, script],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}")
    return done


# Sets RLIMIT_RTPRIO to 0, then execs its arguments. A wrapper process rather than subprocess's
# preexec_fn: preexec_fn makes subprocess fork() the test process, where gRPC's fork handlers can
# restart its poller in the child, which then aborts when the child closes the poller's epoll fd
# before exec (SIGABRT, "epoll_wait error: Bad file descriptor"), a run in a few hundred.
_NO_RTPRIO = (
    "import os, resource, sys; resource.setrlimit(resource.RLIMIT_RTPRIO, (0, 0)); os.execvp(sys.argv[1], sys.argv[1:])"
)


def without_realtime(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` where the kernel refuses it ``SCHED_FIFO``: an ``RLIMIT_RTPRIO`` of 0 and, for
    root, no ``CAP_SYS_NICE`` (through setpriv; the test is skipped where it is missing)."""
    wrapper: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv (util-linux), to run as root without CAP_SYS_NICE")
        wrapper = [setpriv, "--inh-caps=-all", "--bounding-set=-sys_nice"]
    return subprocess.run([*wrapper, sys.executable, "-c", _NO_RTPRIO, *cmd], capture_output=True, text=True, **kwargs)


MODELS = Path(__file__).resolve().parent.parent / "engines" / "models"


def versioned_repository(tmp_path: Path, color_versions: tuple[int, ...], policy: dict | None = None) -> Path:  # type: ignore[type-arg]
    """The embedded repository with the color model in numbered version directories (the ONNX
    file linked, not copied)."""
    root = tmp_path / "models"
    for name in ("detector", "vehicle_type"):
        (root / name).mkdir(parents=True)
        shutil.copy(MODELS / name / "config.yaml", root / name / "config.yaml")
        (root / name / "model.onnx").symlink_to(MODELS / name / "model.onnx")
    config = yaml.safe_load((MODELS / "color" / "config.yaml").read_text())
    config.pop("version", None)
    if policy is not None:
        config["version_policy"] = policy
    (root / "color").mkdir()
    (root / "color" / "config.yaml").write_text(yaml.safe_dump(config))
    for version in color_versions:
        (root / "color" / str(version)).mkdir()
        (root / "color" / str(version) / "model.onnx").symlink_to(MODELS / "color" / "model.onnx")
    return root


class OpenWatch:
    """Blocks until a file is opened (inotify ``IN_OPEN``): how a test sees a worker take a chunk,
    which it announces only in shared memory (its first act on a chunk is to open the batch file)."""

    IN_OPEN = 0x20

    def __init__(self, path: Path) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {path}")

    def wait(self, timeout: float) -> bool:
        """True once the file was opened since the watch began; False after ``timeout``."""
        import select

        ready, _, _ = select.select([self.fd], [], [], timeout)
        return bool(ready) and bool(os.read(self.fd, 4096))

    def close(self) -> None:
        os.close(self.fd)
