"""``--realtime-priority``: the server's main process serves at SCHED_FIFO and its workers at the
normal policy; where the kernel refuses, the server does not start, and says why."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import grpc
import pytest

from engines.scenes import generate_scene
from tests.helpers import without_realtime
from tests.integration.conftest import running_server


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be real-time")
def test_the_main_process_serves_realtime_and_its_workers_do_not(model_repo_dir: Path) -> None:
    with running_server(model_repo_dir, "--null-model", "--realtime-priority", "1") as server:
        main = server.process.pid
        assert os.sched_getscheduler(main) & ~os.SCHED_RESET_ON_FORK == os.SCHED_FIFO
        assert os.sched_getparam(main).sched_priority == 1
        workers = server.worker_pids()
        assert workers, "the pool has workers"
        assert {os.sched_getscheduler(pid) for pid in workers} == {os.SCHED_OTHER}
        with server.client() as client:
            results = client.detect([generate_scene(seed).jpeg for seed in (41, 42)])
        assert [r.code for r in results] == [grpc.StatusCode.OK] * 2
        assert "event loop at SCHED_FIFO priority 1" in server.log()


def test_a_server_the_kernel_refuses_realtime_does_not_start(model_repo_dir: Path) -> None:
    shm_dir = Path(tempfile.mkdtemp(prefix="infer-it-", dir="/dev/shm"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
    try:
        done = without_realtime(
            [sys.executable, "-m", "infer_server", "serve", "--null-model", "--models", str(model_repo_dir),
             "--port", "0", "--shm-dir", str(shm_dir), "--realtime-priority", "1"],
            env=env, timeout=120,
        )  # fmt: skip
    finally:
        shutil.rmtree(shm_dir, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    assert "listening on" not in done.stdout
    assert "cannot start: --realtime-priority 1: the kernel refused SCHED_FIFO" in done.stderr
    assert "CAP_SYS_NICE" in done.stderr
