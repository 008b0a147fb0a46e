"""PushData / PullResult against the real server: transports, concurrency, per-image errors, retries."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_client import AsyncInferClient, ImageResult, InferClient, InferError
from infer_server.front.staging import SPARE_FILES
from tests.integration.conftest import RunningServer


def assert_answers(results: list[ImageResult], scenes: list[Scene]) -> None:
    """One OK result per scene, in index order, with the scene's original size."""
    assert [r.index for r in results] == list(range(len(scenes)))
    for result, scene in zip(results, scenes, strict=True):
        assert result.ok, (result.code, result.message)
        assert (result.width, result.height) == (scene.width, scene.height)
        assert result.worker >= 0 and result.timings_ms


def spares_only(staging: Path) -> bool:
    """Only whole files, no more than the spares kept (``front.staging``)."""
    names = os.listdir(staging)
    return len(names) <= SPARE_FILES and not [name for name in names if name.endswith(".tmp")]


@pytest.mark.parametrize("transport", ["tmpfs", "inline"])
def test_multi_image_batch(server: RunningServer, scenes: list[Scene], transport: str) -> None:
    with server.client(transport=transport) as client:
        assert client.transport == transport
        results = client.detect([s.jpeg for s in scenes[:6]], names=[f"s{i}.jpg" for i in range(6)])
    assert_answers(results, scenes[:6])
    assert [r.name for r in results] == [f"s{i}.jpg" for i in range(6)]
    assert len({r.batch_id for r in results}) == 1
    # The client deleted its batch file once the results were in; the server left nothing staged
    # but the spare files it rewrites for later inline batches (with --shards, each shard in its own
    # staging directory beside the main process's).
    staging = sorted(os.listdir(server.shm_dir))
    assert staging[0] == ".server" and all(name.startswith(".server.shard-") for name in staging[1:])
    assert all(spares_only(server.shm_dir / name) for name in staging)


def test_image_paths_and_auto_transport(server: RunningServer, scenes: list[Scene], tmp_path: Path) -> None:
    paths = []
    for i, scene in enumerate(scenes[:2]):
        paths.append(tmp_path / f"scene{i}.jpg")
        paths[-1].write_bytes(scene.jpeg)
    with server.client() as client:
        assert client.transport == "tmpfs"  # 127.0.0.1 and a writable shared directory
        results = client.detect(paths)
    assert [r.name for r in results] == ["scene0.jpg", "scene1.jpg"]
    assert_answers(results, scenes[:2])


def test_concurrent_clients_in_threads(server: RunningServer, scenes: list[Scene]) -> None:
    outcomes: dict[int, list[ImageResult]] = {}

    def work(n: int) -> None:
        transport = "tmpfs" if n % 2 else "inline"
        with server.client(transport=transport) as client:
            outcomes[n] = client.detect([s.jpeg for s in scenes[n : n + 3]])

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcomes) == [0, 1, 2, 3]
    for n, results in outcomes.items():
        assert_answers(results, scenes[n : n + 3])


def test_concurrent_asyncio_clients(server: RunningServer, scenes: list[Scene]) -> None:
    async def main() -> list[list[ImageResult]]:
        async with AsyncInferClient(server.address, shm_dir=server.shm_dir) as client:
            await client.wait_ready(timeout=30)
            return await asyncio.gather(*(client.detect([s.jpeg for s in scenes[n : n + 2]]) for n in range(5)))

    for n, results in enumerate(asyncio.run(main())):
        assert_answers(results, scenes[n : n + 2])


def test_corrupt_jpeg_fails_alone(client: InferClient, scenes: list[Scene]) -> None:
    truncated = scenes[1].jpeg[: len(scenes[1].jpeg) // 3]
    garbage = b"\xff\xd8\xff\xe0" + b"\x00" * 200  # JPEG magic, nothing decodable after it
    results = client.detect([scenes[0].jpeg, truncated, garbage, scenes[2].jpeg])
    assert [r.code for r in results] == [
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.OK,
    ]
    assert results[1].message and results[2].message
    assert_answers([results[0]], scenes[:1])


def test_unknown_batch_is_not_found(client: InferClient) -> None:
    with pytest.raises(InferError) as info:
        list(client.pull("0" * 32))
    assert info.value.code == grpc.StatusCode.NOT_FOUND


def test_retried_request_id_returns_the_same_batch(client: InferClient, scenes: list[Scene]) -> None:
    first = client.push([scenes[0].jpeg, scenes[1].jpeg], request_id="retry-me")
    again = client.push([scenes[0].jpeg, scenes[1].jpeg], request_id="retry-me")
    assert again == first
    assert sorted(r.index for r in client.pull(first)) == [0, 1]  # two results, not four


def test_cancelled_pull_loses_nothing(client: InferClient, scenes: list[Scene]) -> None:
    batch_id = client.push([s.jpeg for s in scenes[:4]])
    received = []
    # The deadline cancels the stream while the server still waits for the first result.
    with pytest.raises(InferError) as info:
        for result in client.pull(batch_id, timeout=0.05):
            received.append(result)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    received += client.pull(batch_id)
    assert sorted(r.index for r in received) == [0, 1, 2, 3]


def test_stopped_pull_never_repeats_a_result(client: InferClient, scenes: list[Scene]) -> None:
    batch_id = client.push([s.jpeg for s in scenes[:4]])
    stream = client.pull(batch_id)
    first = next(stream)
    stream.close()  # cancels the call; results the server had not sent yet stay available
    indices = [first.index, *(r.index for r in client.pull(batch_id))]
    assert len(indices) == len(set(indices)) and set(indices) <= {0, 1, 2, 3}


def test_pull_several_batches_in_one_stream(client: InferClient, scenes: list[Scene]) -> None:
    a = client.push([scenes[0].jpeg, scenes[1].jpeg])
    b = client.push([scenes[2].jpeg])
    got = sorted((r.batch_id, r.index) for r in client.pull([a, b]))
    assert got == sorted([(a, 0), (a, 1), (b, 0)])
