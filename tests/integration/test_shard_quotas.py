"""Per-caller quotas on a server of two shards: a caller's in-flight work is counted on both
together (``front.caller_usage``), whichever shard's socket each push comes on, and a shard that
is started again holds nothing of what its killed predecessor held.

Work stays in flight because every worker is stopped (SIGSTOP) while the pushes come, then let go."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_client import InferError, LocalSession
from infer_client._protocol import BatchFiles, PushedBatches
from infer_proto.shards import shard_socket
from tests.integration.conftest import RunningServer, running_server
from tests.integration.test_shards import killed_while_health_says_so, shard_pids

pytestmark = pytest.mark.skipif("config.getoption('--local-socket')", reason="the same servers as without the option")

QUOTA = 4  # images in flight per caller, on the whole server


@pytest.fixture
def quoted(model_repo_dir: Path) -> Iterator[RunningServer]:
    folder = Path(tempfile.mkdtemp(prefix="infer-quotas-"))
    path = folder / "local.sock"
    args = ("--null-model", "--local-socket", str(path), "--shards", "2",
            "--max-inflight-images-per-identity", str(QUOTA))  # fmt: skip
    with running_server(model_repo_dir, *args, workers=2) as srv:
        srv.local_socket = path
        yield srv
    folder.rmdir()


@contextlib.contextmanager
def workers_stopped(server: RunningServer) -> Iterator[None]:
    """Every stage worker of every shard stopped: what is pushed meanwhile stays in flight."""
    workers = server.worker_pids()  # both shards' (their processes are the server's descendants)
    assert len(workers) == 2
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def on_shard(server: RunningServer, shard: int) -> Iterator[LocalSession]:
    assert server.local_socket is not None
    path = shard_socket(server.local_socket, shard)
    with LocalSession(path, "inline", PushedBatches(BatchFiles(str(server.shm_dir))), 30.0) as session:
        yield session


def refused_for_quota(session: LocalSession, images: list[bytes]) -> str:
    with pytest.raises(InferError) as refused:
        session.push(images)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    return refused.value.message


def test_a_callers_quota_spans_both_shards(quoted: RunningServer, scenes: list[Scene]) -> None:
    jpeg = scenes[0].jpeg
    with on_shard(quoted, 0) as zero, on_shard(quoted, 1) as one:
        with workers_stopped(quoted):
            on_zero = zero.push([jpeg] * 3)  # the whole quota is there to be had on one shard
            assert "this caller has 3 images" in refused_for_quota(one, [jpeg] * 2)
            on_one = one.push([jpeg])
            assert "this caller has 4 images" in refused_for_quota(zero, [jpeg])
        assert len(list(zero.results(on_zero, timeout=60))) == 3
        assert len(list(one.results(on_one, timeout=60))) == 1
        done = one.push([jpeg] * QUOTA)  # finished work no longer counts, on either shard
        assert len(list(one.results(done, timeout=60))) == QUOTA


def test_a_shard_started_again_holds_nothing_of_its_predecessors(quoted: RunningServer, scenes: list[Scene]) -> None:
    jpeg = scenes[0].jpeg
    (shard,) = shard_pids(quoted)
    with workers_stopped(quoted):
        with on_shard(quoted, 1) as one:
            one.push([jpeg] * 3)  # in flight on shard 1 until it is killed
        with on_shard(quoted, 0) as zero:
            assert "this caller has 3 images" in refused_for_quota(zero, [jpeg] * 2)
        killed_while_health_says_so(quoted, shard)  # its replacement's workers run
    with on_shard(quoted, 0) as zero:
        batch_id = zero.push([jpeg] * QUOTA)
        assert len(list(zero.results(batch_id, timeout=60))) == QUOTA
