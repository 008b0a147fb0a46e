"""Shards (``--shards``): what an id says about its shard, what each shard is given, and the
registry's answer for another shard's batch."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from infer_proto.shards import batch_shard, new_batch_id, request_shard, shard_socket
from infer_server.front.batches import BatchRegistry
from infer_server.front.errors import Refused, UnknownBatch
from infer_server.front.shards import remove_leftovers, shard_settings
from infer_server.messages import ImageRef
from infer_server.settings import ServerSettings


def test_a_request_id_belongs_to_one_shard_the_same_on_every_side() -> None:
    assert request_shard("camera-7/frame-1", 1) == 0
    assert request_shard("a", 2) == 0xE8B7BE43 % 2  # crc32: the client library computes the same
    shards = {request_shard(f"frame-{n}", 4) for n in range(64)}
    assert shards == {0, 1, 2, 3}


def test_a_batch_id_names_its_shard() -> None:
    for shard in range(16):
        batch_id = new_batch_id(shard, 16)
        assert len(batch_id) == 32 and int(batch_id, 16) >= 0
        assert batch_shard(batch_id, 16) == shard
    assert batch_shard(new_batch_id(3, 4), 2) is None  # names no shard of two: unknown, as any id
    assert batch_shard("not-hex", 2) is None and batch_shard("", 2) is None
    assert batch_shard("f" * 32, 1) == 0
    assert len({new_batch_id(0, 1)[0] for _ in range(200)}) > 1  # one shard: random throughout


def test_each_shard_gets_its_share_and_its_own_socket_and_directories(tmp_path: Path) -> None:
    whole = ServerSettings(
        shm_dir=tmp_path / "shm", local_socket=tmp_path / "local.sock", shards=2, workers=3, metrics_port=9100,
        max_inflight_images=1000, max_inflight_bytes=1001, max_inflight_images_per_identity=300,
        max_batch_images=600, max_batch_bytes=300, result_cache_entries=10, unix_socket=tmp_path / "grpc.sock",
        max_inflight_bytes_per_identity=200,
    )  # fmt: skip
    main = shard_settings(whole)
    other = shard_settings(whole.model_copy(update={"shard_index": 1}))
    assert (main.workers, other.workers) == (2, 1)
    assert main.max_inflight_images == other.max_inflight_images == 600  # never below the largest batch
    assert other.max_inflight_bytes == 500
    assert (other.result_cache_entries, other.result_cache_mib) == (5, 32)
    # Per-caller quotas stay whole: every shard counts the caller's work on all of them (front.caller_usage).
    assert (other.max_inflight_images_per_identity, other.max_inflight_bytes_per_identity) == (300, 200)
    half = shard_settings(whole.model_copy(update={"max_inflight_bytes_per_identity": None, "shard_index": 1}))
    assert half.max_inflight_bytes_per_identity == 1001  # the one not set: the whole server's, as without shards
    unset = whole.model_copy(update={"max_inflight_images_per_identity": None, "max_inflight_bytes_per_identity": None})
    assert shard_settings(unset).max_inflight_images_per_identity is None  # no quotas: the shard's own bounds
    assert (main.local_socket, main.unix_socket, main.metrics_port) == (whole.local_socket, whole.unix_socket, 9100)
    assert other.local_socket == Path(shard_socket(tmp_path / "local.sock", 1)) == tmp_path / "local.sock.1"
    assert (other.unix_socket, other.metrics_port, other.fronts) == (None, None, 0)
    assert other.staging == tmp_path / "shm" / ".server.shard-1" and main.staging == whole.staging
    assert shard_settings(ServerSettings()) == ServerSettings()  # one shard: the settings as given
    # Every shard's log lines, and its workers', say whose they are; one shard's need not.
    marks = (main.log_mark, other.worker_options().log_mark, ServerSettings().log_mark)
    assert marks == ("[shard 0] ", "[shard 1] ", "")


def test_shards_need_the_local_socket_and_have_a_worker_each(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="--shards needs --local-socket"):
        ServerSettings(shards=2)
    whole = ServerSettings(shards=3, workers=2, local_socket=tmp_path / "local.sock")
    shares = [shard_settings(whole.model_copy(update={"shard_index": k})) for k in range(3)]
    assert [share.workers for share in shares] == [1, 1, 1]
    for share in shares:  # a share is valid settings too (front processes validate what they are sent)
        assert ServerSettings.model_validate_json(share.model_dump_json()) == share


def test_another_shards_batch_is_refused_with_where_it_is_not_unknown() -> None:
    async def run() -> None:
        registry = BatchRegistry(max_inflight_images=8, max_inflight_bytes=100, result_ttl_s=60, shard=(1, 2))
        reservation = registry.reserve("", (ImageRef(0, 0, 10, "a"),), 10, deadline=1e12)
        assert batch_shard(reservation.batch.batch_id, 2) == 1
        with pytest.raises(Refused, match="shard 0's"):
            registry.subscribe([new_batch_id(0, 2)])
        with pytest.raises(UnknownBatch):
            registry.subscribe([new_batch_id(1, 2)])  # its own shard's, unknown: NOT_FOUND as ever
        with pytest.raises(UnknownBatch):
            registry.subscribe([new_batch_id(5, 8)])  # names no shard of two

    asyncio.run(run())


def test_staging_directories_of_shards_an_earlier_run_had_are_removed(tmp_path: Path) -> None:
    """A shard that crashed left other callers' staged bytes; a run with fewer shards never sweeps
    that directory, so the main process removes it as it starts (its own user's directories only)."""
    shm = tmp_path / "shm"
    for name in (".server.shard-1", ".server.shard-3", ".server.shard-x", "other.shard-7"):
        (shm / name).mkdir(parents=True)
        (shm / name / "staged.batch").write_bytes(b"someone's image")
    (tmp_path / "elsewhere").mkdir()
    (shm / ".server.shard-5").symlink_to(tmp_path / "elsewhere")
    (shm / ".server.shard-4").mkdir()
    held = os.open(shm / ".server.shard-4", os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)  # as a running shard (of a server started before this one) holds it
    whole = ServerSettings(shm_dir=shm, local_socket=tmp_path / "local.sock", shards=2)
    try:
        remove_leftovers(whole)
    finally:
        os.close(held)
    assert sorted(p.name for p in shm.iterdir()) == [".server.shard-1", ".server.shard-4", ".server.shard-5",
                                                     ".server.shard-x", "other.shard-7"]  # fmt: skip
    assert (tmp_path / "elsewhere").is_dir()
    remove_leftovers(whole.model_copy(update={"shards": 1, "local_socket": None}))
    assert not (shm / ".server.shard-1").exists()


def test_batch_ids_never_repeat_and_a_forked_child_draws_its_own() -> None:
    ids = {new_batch_id(0, 1) for _ in range(3000)}  # past several draws of the buffer
    assert len(ids) == 3000 and all(len(i) == 32 for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id must not be the one the parent makes next
        os.write(write, new_batch_id(0, 1).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 64).decode() != new_batch_id(0, 1)
    os.close(read)
    os.close(write)


def test_threads_drawing_batch_ids_at_once_never_share_one() -> None:
    ids: list[str] = []

    def draw() -> None:
        ids.extend(new_batch_id(0, 1) for _ in range(2000))

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == len(ids) == 8000
