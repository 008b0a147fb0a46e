"""A server of two shards (``--shards 2``): two data planes, each with its own local socket.

The client library routes (``infer_client.routed``): these tests use it and, where the server must
defend a rule a client could break, the plain one-socket ``LocalSession`` against it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.procs import descendants, exit_waiters, read_address, still_running
from benchmarks.servers import cmdline
from engines.scenes import Scene
from infer_client import AsyncInferClient, InferError, LocalSession, RoutedSession
from infer_client._protocol import BatchFiles, PushedBatches
from infer_client.local import ended_with
from infer_proto import infer_pb2, infer_pb2_grpc
from infer_proto.framing import HEADER, Kind, encode_call_start, frame
from infer_proto.shards import batch_shard, request_shard, shard_socket
from tests.helpers import MODELS, versioned_repository
from tests.integration.conftest import STARTUP_TIMEOUT_S, RunningServer, bare_server, running_server

# Its servers have their own local socket and shards: the suite's --local-socket pass would repeat it.
pytestmark = pytest.mark.skipif("config.getoption('--local-socket')", reason="the same servers as without the option")


@pytest.fixture(scope="module")
def sharded(model_repo_dir: Path) -> Iterator[RunningServer]:
    folder = Path(tempfile.mkdtemp(prefix="infer-shards-"))
    path = folder / "local.sock"
    args = ("--null-model", "--local-socket", str(path), "--shards", "2")
    with running_server(model_repo_dir, *args, workers=2) as srv:
        srv.local_socket = path
        yield srv
    assert not Path(f"{path}.1").exists(), "shard 1's socket outlived the server"
    folder.rmdir()


def _request_id(shard: int, stem: str) -> str:
    """A request id that belongs to ``shard`` of two."""
    return next(f"{stem}-{n}" for n in range(100) if request_shard(f"{stem}-{n}", 2) == shard)


def shard_pids(server: RunningServer) -> list[int]:
    return [pid for pid in descendants(server.process.pid) if b"infer_server.front.shards" in cmdline(pid)]


def test_sessions_spread_over_the_shards_and_each_batch_is_its_shards(
    sharded: RunningServer, scenes: list[Scene]
) -> None:
    images = [s.jpeg for s in scenes[:3]]
    with sharded.client() as client, client.session() as first, client.session() as second:
        assert isinstance(first, RoutedSession) and isinstance(second, RoutedSession)
        assert {first.home, second.home} == {0, 1}  # shard 0 suggests each in turn
        for session in (first, second):
            batch_id = session.push(images)
            assert batch_id.startswith(str(session.home))
            assert sorted(r.index for r in session.results(batch_id)) == [0, 1, 2]
            assert [r.index for r in session.detect(images[:2])] == [0, 1]
    assert len(shard_pids(sharded)) == 1


def test_each_shards_log_lines_say_whose_they_are(sharded: RunningServer) -> None:
    serving = [line for line in sharded.log_path.read_text().splitlines() if ": serving on " in line]
    assert len(serving) == 2
    main, other = sorted(serving, key=lambda line: "[shard 1]" in line)
    assert " [shard 0] INFO infer_server.front.server: serving on 127.0.0.1:" in main
    assert f" [shard 1] INFO infer_server.front.server: serving on {sharded.local_socket}.1 with 1 workers" in other


def test_a_request_id_is_one_batch_whichever_session_repeats_it(sharded: RunningServer, scenes: list[Scene]) -> None:
    images = [s.jpeg for s in scenes[:2]]
    with sharded.client() as client, client.session() as first, client.session() as second:
        for shard in (0, 1):
            request_id = _request_id(shard, "repeat")
            batch_id = first.push(images, request_id=request_id)
            assert batch_id.startswith(str(shard))  # the id's shard, not the session's own
            assert sorted(r.index for r in first.results(batch_id)) == [0, 1]
            assert second.push(images, request_id=request_id) == batch_id  # no second batch


def test_a_push_on_the_wrong_shards_socket_is_refused(sharded: RunningServer, scenes: list[Scene]) -> None:
    """A client that does not route could otherwise push one request twice, once on each shard."""
    assert sharded.local_socket is not None
    for shard, path in ((0, f"{sharded.local_socket}.1"), (1, str(sharded.local_socket))):
        request_id = _request_id(shard, "elsewhere")
        pushed = PushedBatches(BatchFiles(str(sharded.shm_dir)))
        with LocalSession(path, "inline", pushed, 30.0) as session, pytest.raises(InferError) as refused:
            session.push([scenes[0].jpeg], request_id=request_id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"shard {shard}'s" in refused.value.message
        with pytest.raises(InferError) as refused:  # PushData alike: only gRPC's pushes are routed
            _push_data(path, [scenes[0].jpeg], request_id)
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION and f"shard {shard}'s" in refused.value.message


def test_grpc_reaches_every_shard(sharded: RunningServer, scenes: list[Scene]) -> None:
    """Only the main process serves gRPC: it hands a push without a request id to each shard in
    turn, and a pull reads each batch on its shard, whichever transport pushed it."""
    assert sharded.local_socket is not None
    images = [s.jpeg for s in scenes[:2]]
    with sharded.client(local_socket=None) as grpc_only:
        pushed = [grpc_only.push(images) for _ in range(4)]
        assert sorted(batch_shard(b, 2) for b in pushed) == [0, 0, 1, 1]
        unread = _push_data(f"{sharded.local_socket}.1", images, _request_id(1, "for-grpc"))  # on shard 1's socket
        results = list(grpc_only.pull([*pushed, unread], timeout=30))
    assert sorted((r.batch_id, r.index) for r in results) == sorted((b, i) for b in (*pushed, unread) for i in (0, 1))
    assert all(r.ok for r in results)


def test_a_grpc_session_spreads_and_a_request_id_is_one_batch_on_every_transport(
    sharded: RunningServer, scenes: list[Scene]
) -> None:
    """A gRPC Session's pushes go to their shards too: without a request id each in turn, with one
    to the id's shard, where a client on the local socket pushes it: one id, one batch."""
    images = [s.jpeg for s in scenes[:3]]
    with sharded.client(local_socket=None) as grpc_only, grpc_only.session() as session:
        answered = [session.detect(images) for _ in range(4)]
        assert sorted(batch_shard(r[0].batch_id, 2) for r in answered) == [0, 0, 1, 1]
        assert all(len(r) == 3 and all(x.ok for x in r) for r in answered)
        ids = [_request_id(k, "both-ways") for k in (0, 1)]
        by_grpc = [session.push(images, request_id=i) for i in ids]
        assert [batch_shard(b, 2) for b in by_grpc] == [0, 1]
        assert {r.batch_id for b in by_grpc for r in session.results(b, timeout=30)} == set(by_grpc)
        by_unary = grpc_only.push(images, request_id=ids[1])
    with sharded.client() as local, local.session() as on_socket:
        by_socket = [on_socket.push(images, request_id=i) for i in ids]
    assert by_socket == by_grpc and by_unary == by_grpc[1]


def _push_data(path: str, images: list[bytes], request_id: str) -> str:
    """PushData on a shard's local socket, by its frames: a batch no stream is reading."""
    request = infer_pb2.PushDataRequest(data=b"".join(images), sizes=[len(i) for i in images], request_id=request_id)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(frame(1, Kind.START, encode_call_start("/infer.v1.InferenceService/PushData", ())))
        replies, received = [], b""
        while not replies or replies[-1][0] != Kind.END:
            received += sock.recv(65536)
            while len(received) >= HEADER.size and len(received) >= HEADER.size + HEADER.unpack_from(received)[2]:
                _, kind, length = HEADER.unpack_from(received)
                replies.append((kind, received[HEADER.size : HEADER.size + length]))
                received = received[HEADER.size + length :]
                if kind == Kind.WANT:
                    sock.sendall(frame(1, Kind.MESSAGE, request.SerializeToString()) + frame(1, Kind.HALF_CLOSE))
    if not (messages := [payload for kind, payload in replies if kind == Kind.MESSAGE]):
        raise ended_with(replies[-1][1]) or AssertionError("no reply and no error")
    return infer_pb2.PushDataReply.FromString(messages[0]).batch_id


def test_a_pull_reads_each_batch_on_its_shards_socket(sharded: RunningServer, scenes: list[Scene]) -> None:
    assert sharded.local_socket is not None
    images = [s.jpeg for s in scenes[:3]]

    def pushed(stem: str) -> list[str]:  # one batch on each shard, nobody reading its results yet
        return [_push_data(shard_socket(sharded.local_socket, k), images, _request_id(k, stem)) for k in (0, 1)]

    batch_ids = pushed("unread")
    assert [b[0] for b in batch_ids] == ["0", "1"]
    with sharded.client() as client:
        results = list(client.pull(batch_ids, timeout=60))  # one pull: a call on each shard's socket
    assert sorted((r.batch_id, r.index) for r in results) == sorted((b, i) for b in batch_ids for i in range(3))

    async def pull_on_the_loop(batch_ids: list[str]) -> list[tuple[str, int]]:
        aio = AsyncInferClient(sharded.address, shm_dir=sharded.shm_dir, local_socket=sharded.local_socket)
        async with aio:
            return [(r.batch_id, r.index) async for r in aio.pull(batch_ids, timeout=60)]

    batch_ids = pushed("unread-aio")
    assert sorted(asyncio.run(pull_on_the_loop(batch_ids))) == sorted((b, i) for b in batch_ids for i in range(3))


def test_the_asyncio_client_routes_too(sharded: RunningServer, scenes: list[Scene]) -> None:
    images = [s.jpeg for s in scenes[:2]]

    async def run() -> None:
        aio = AsyncInferClient(sharded.address, shm_dir=sharded.shm_dir, local_socket=sharded.local_socket)
        async with aio, aio.session() as session:
            for shard in (0, 1):
                request_id = _request_id(shard, "async")
                batch_id = await session.push(images, request_id=request_id)
                assert batch_id.startswith(str(shard))
                assert sorted([r.index async for r in session.results(batch_id)]) == [0, 1]
                assert await session.push(images, request_id=request_id) == batch_id
            assert [r.index for r in await session.detect(images)] == [0, 1]

    asyncio.run(run())


def _statuses(channel: grpc.Channel) -> Iterator[int]:
    for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120):
        yield reply.status


def killed_while_health_says_so(
    server: RunningServer, pid: int, meanwhile: Callable[[], None] = lambda: None
) -> None:
    """Kill ``pid``: the server's health goes NOT_SERVING (then ``meanwhile`` runs), then SERVING
    again once it is replaced."""
    with grpc.insecure_channel(server.address) as channel:
        statuses = _statuses(channel)
        assert next(statuses) == health_pb2.HealthCheckResponse.SERVING
        os.kill(pid, signal.SIGKILL)
        assert next(statuses) == health_pb2.HealthCheckResponse.NOT_SERVING
        meanwhile()
        assert next(statuses) == health_pb2.HealthCheckResponse.SERVING


def test_a_killed_shard_is_started_again_while_health_says_so(sharded: RunningServer, scenes: list[Scene]) -> None:
    (shard,) = shard_pids(sharded)
    workers = exit_waiters(descendants(shard))

    def on_grpc_meanwhile() -> None:  # shard 1's request ids and batches wait for it, on gRPC too
        with sharded.client(local_socket=None) as grpc_only:
            with pytest.raises(InferError) as refused:
                grpc_only.push([scenes[0].jpeg], request_id=_request_id(1, "meanwhile"))
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE and "shard 1" in refused.value.message
            with pytest.raises(InferError) as where:
                list(grpc_only.pull("1" + "0" * 31, timeout=10))
            assert where.value.code == grpc.StatusCode.FAILED_PRECONDITION and "shard 1's" in where.value.message

    killed_while_health_says_so(sharded, shard, on_grpc_meanwhile)
    assert still_running(workers, timeout=20) == [], "the killed shard's workers outlived it"
    (replacement,) = shard_pids(sharded)
    assert replacement != shard
    with sharded.client() as client, client.session() as session:
        batch_id = session.push([scenes[0].jpeg], request_id=_request_id(1, "after-kill"))
        assert batch_id.startswith("1") and len(list(session.results(batch_id))) == 1
    assert "shard 1 (pid" in sharded.log_path.read_text()


def test_shards_exit_with_the_main_process(model_repo_dir: Path, tmp_path: Path) -> None:
    args = ("--workers", "2", "--local-socket", str(tmp_path / "local.sock"), "--shards", "2")
    with bare_server(model_repo_dir, tmp_path / "server.log", *args) as process:
        read_address(process, STARTUP_TIMEOUT_S)
        children = descendants(process.pid)
        assert any(b"infer_server.front.shards" in cmdline(pid) for pid in children)
        waiters = exit_waiters(children)
        process.kill()  # no drain, no goodbye: the shard sees its link close
        process.wait()
        assert still_running(waiters, timeout=30) == []
        assert not (tmp_path / "local.sock.1").exists()


def test_every_shard_follows_a_polled_repository(tmp_path: Path, scenes: list[Scene]) -> None:
    repo = versioned_repository(tmp_path, (1,), {"latest": 1})
    path = tmp_path / "local.sock"
    args = ("--repository-poll-s", "0.2", "--local-socket", str(path), "--shards", "2")
    with running_server(repo, *args, workers=2) as server:
        server.local_socket = path
        with server.client() as client, client.session() as first, client.session() as second:
            assert {first.home, second.home} == {0, 1}
            assert {s.detect([scenes[0].jpeg])[0].model_versions["color"] for s in (first, second)} == {"1"}
            (repo / "color" / "2").mkdir()
            (repo / "color" / "2" / "model.onnx").symlink_to(MODELS / "color" / "model.onnx")
            for session in (first, second):  # each answer is a wait: the poll moves each shard's workers
                versions = (session.detect([scenes[0].jpeg])[0].model_versions["color"] for _ in range(2000))
                assert "2" in versions, f"shard {session.home} did not move to version 2"


def test_a_shard_that_cannot_start_fails_the_start(model_repo_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "local.sock.1").write_text("not a socket")  # shard 1 refuses to replace it
    args = ("--workers", "3", "--local-socket", str(tmp_path / "local.sock"), "--shards", "3")
    with bare_server(model_repo_dir, tmp_path / "server.log", *args) as process:
        assert process.wait(timeout=STARTUP_TIMEOUT_S) == 1
        assert process.stdout is not None and "listening" not in process.stdout.read()
    assert "cannot start: shard 1 did not start" in (tmp_path / "server.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.sock.1", "server.log"]  # shard 2 went too


def test_no_shard_takes_a_path_into_another_shards_staging(sharded: RunningServer, scenes: list[Scene]) -> None:
    """Each shard stages inline pushes (other callers' bytes) in a directory of its own; the main
    process must refuse a path into shard 1's as it refuses one into its own (a staged file there
    is the server's, 0600, one link: every other check would pass)."""
    with sharded.client(transport="inline") as client, client.session() as session:
        batch_id = session.push([scenes[0].jpeg], request_id=_request_id(1, "staged"))
        assert len(list(session.results(batch_id))) == 1
    staging = sharded.shm_dir / ".server.shard-1"
    assert staging.is_dir()
    with grpc.insecure_channel(sharded.address) as channel, pytest.raises(grpc.RpcError) as refused:
        request = infer_pb2.PushDataRequest(path=str(staging / "spare.batch"), sizes=[len(scenes[0].jpeg)])
        infer_pb2_grpc.InferenceServiceStub(channel).PushData(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused.value.details() == "path points into the server's own directory"


def test_a_push_with_a_request_id_goes_to_the_ids_shard_as_a_sessions_would(
    sharded: RunningServer, scenes: list[Scene]
) -> None:
    """``InferClient.push`` (and the asyncio client's) with a request id, given the local socket: on
    the id's shard, so that the same id pushed on a session finds the same batch (over gRPC it
    would be shard 0's, and run twice)."""
    images = [s.jpeg for s in scenes[:2]]
    request_id = _request_id(1, "unary")
    with sharded.client() as client:
        batch_id = client.push(images, request_id=request_id)
        assert batch_id.startswith("1") and client.push(images, request_id=request_id) == batch_id
        with client.session() as session:  # the repeat takes the batch's results on its stream
            assert session.push(images, request_id=request_id) == batch_id
            assert sorted(r.index for r in session.results(batch_id)) == [0, 1]

    async def push_on_the_loop() -> str:
        async with AsyncInferClient(sharded.address, shm_dir=sharded.shm_dir, local_socket=sharded.local_socket) as aio:
            return await aio.push(images, request_id=request_id)

    assert asyncio.run(push_on_the_loop()) == batch_id


def test_a_dead_worker_of_a_shard_is_the_servers_health(sharded: RunningServer) -> None:
    """The server is NOT_SERVING while a shard's worker is being replaced, as it is for one of the
    main process's own."""
    (shard,) = shard_pids(sharded)
    (worker,) = [pid for pid in descendants(shard) if b"spawn_main" in cmdline(pid)]
    killed_while_health_says_so(sharded, worker)
    assert shard_pids(sharded) == [shard], "the shard itself lives on"
