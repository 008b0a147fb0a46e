"""The Session stream against the real server: many pushes on one stream, in-band refusals, retries,
a broken stream that loses nothing, and the batch files the client reuses."""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_client import AsyncInferClient, InferError
from infer_proto import infer_pb2, infer_pb2_grpc
from tests.integration.conftest import RunningServer
from tests.integration.test_push_pull import assert_answers


def batch_files(server: RunningServer) -> list[str]:
    return [name for name in os.listdir(server.shm_dir) if name.endswith(".batch")]


@pytest.mark.parametrize("transport", ["tmpfs", "inline"])
def test_many_batches_on_one_session(server: RunningServer, scenes: list[Scene], transport: str) -> None:
    with server.client(transport=transport) as client, client.session() as session:
        pushed = [(session.push([s.jpeg for s in scenes[n : n + 2]]), scenes[n : n + 2]) for n in range(0, 6, 2)]
        for batch_id, expected in reversed(pushed):  # read in any order: results wait in the session
            assert_answers(sorted(session.results(batch_id), key=lambda r: r.index), expected)
        with pytest.raises(ValueError):
            list(session.results(pushed[0][0]))  # read already
        if transport == "tmpfs":
            # Every batch is done: the client keeps its files for the next batches, nothing else.
            assert 1 <= len(batch_files(server)) <= 3
    assert batch_files(server) == [], "closing the client removes the files it kept"


def test_a_refused_push_is_answered_in_band_and_the_session_goes_on(
    server: RunningServer, scenes: list[Scene], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(scenes[0].jpeg)
    with server.client() as client, client.session() as session:
        stub = infer_pb2_grpc.InferenceServiceStub(client._channel)
        requests = iter(
            [
                infer_pb2.SessionRequest(tag=7, push=infer_pb2.PushDataRequest(path=str(outside), sizes=[9])),
                infer_pb2.SessionRequest(tag=8, push=infer_pb2.PushDataRequest(data=b"x", sizes=[1])),
            ]
        )
        replies = list(stub.Session(requests, timeout=60))
        answers = [a for r in replies for a in r.answers]
        assert [(a.tag, a.status.code) for a in answers] == [(7, grpc.StatusCode.PERMISSION_DENIED.value[0]), (8, 0)]
        assert answers[0].status.message == "path is outside the shared directory" and not answers[0].batch_id
        results = [r for reply in replies for r in reply.results]
        assert [(r.batch_id, r.status.code) for r in results] == [(answers[1].batch_id, 3)]  # b"x" is no JPEG
        assert [b for r in replies for b in r.completed] == [answers[1].batch_id]

        with pytest.raises(InferError) as info:
            session.push([b""])
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert_answers(session.detect([scenes[1].jpeg]), scenes[1:2])


def test_a_deferred_answer_comes_with_the_first_results_and_a_refusal_at_once(
    server: RunningServer, scenes: list[Scene], tmp_path: Path
) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(scenes[0].jpeg)
    jpeg = scenes[0].jpeg
    with server.client() as client:
        # Both workers are given another batch first, so the first result of push 1 cannot come
        # before the server has read and refused push 2 (with the workers idle that was a race,
        # lost now and then on a loaded machine).
        filler = client.push([s.jpeg for s in scenes[:8]] * 2)
        stub = infer_pb2_grpc.InferenceServiceStub(client._channel)
        requests = iter(
            [
                infer_pb2.SessionRequest(
                    tag=1, push=infer_pb2.PushDataRequest(data=jpeg, sizes=[len(jpeg)]), defer_answer=True
                ),
                infer_pb2.SessionRequest(
                    tag=2, push=infer_pb2.PushDataRequest(path=str(outside), sizes=[9]), defer_answer=True
                ),
            ]
        )
        replies = list(stub.Session(requests, timeout=60))
        assert len(list(client.pull(filler, timeout=120))) == 16
    assert [a.tag for a in replies[0].answers] == [2] and not replies[0].results, "the refusal goes first"
    assert replies[0].answers[0].status.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
    (answer,) = [a for r in replies for a in r.answers if a.tag == 1]
    (carrier,) = [r for r in replies if answer in r.answers]
    assert [r.batch_id for r in carrier.results] == [answer.batch_id], "the answer travels with the result"
    assert sum(len(r.answers) for r in replies) == 2 and len(replies) == 2


def test_a_deferred_answer_of_a_batch_already_delivered_comes_with_its_completion(
    server: RunningServer, scenes: list[Scene]
) -> None:
    request_id = uuid.uuid4().hex
    with server.client() as client, client.session() as session:
        batch_id = session.push([scenes[0].jpeg], request_id=request_id, defer_answer=True)
        assert len(list(session.results(batch_id))) == 1
        # The same push again on the same session: nothing more comes of it but its completion.
        assert session.push([scenes[0].jpeg], request_id=request_id, defer_answer=True) == batch_id
        assert list(session.results(batch_id, timeout=30)) == []
        assert_answers(session.detect([scenes[1].jpeg]), scenes[1:2])


def test_a_retried_push_on_a_new_session_ends_even_if_its_results_went_elsewhere(
    server: RunningServer, scenes: list[Scene]
) -> None:
    request_id = uuid.uuid4().hex
    with server.client() as client:
        with client.session() as first:
            batch_id = first.push([scenes[0].jpeg], request_id=request_id)
            assert len(list(first.results(batch_id))) == 1
        with client.session() as second:  # e.g. the first answer was lost: push again, same request_id
            assert second.push([scenes[0].jpeg], request_id=request_id) == batch_id
            assert list(second.results(batch_id, timeout=30)) == [], "delivered already; the batch completes"
            with pytest.raises(InferError) as info:  # detect() never returns a short list
                second.detect([scenes[0].jpeg], request_id=request_id)
            assert info.value.code == grpc.StatusCode.DATA_LOSS


def test_a_broken_session_loses_nothing(server: RunningServer, scenes: list[Scene]) -> None:
    with server.client() as client:
        session = client.session()
        batch_id = session.push([s.jpeg for s in scenes[:3]])
        session.cancel()  # the stream breaks right after the answer, long before the models are done
        got = set()
        with pytest.raises(InferError) as info:
            got |= {r.index for r in session.results(batch_id)}
        assert info.value.code == grpc.StatusCode.CANCELLED and session.broken
        # Whatever the session did not receive is still the batch's, for PullResult.
        pulled = {r.index for r in client.pull(batch_id)}
        assert got | pulled == {0, 1, 2} and not got & pulled
        # detect() opens a fresh session of its own.
        assert_answers(client.detect([scenes[3].jpeg]), scenes[3:4])


def test_threads_share_one_session(server: RunningServer, scenes: list[Scene]) -> None:
    failures: list[BaseException] = []
    with server.client() as client, client.session() as session:

        def work(n: int) -> None:
            try:
                assert_answers(session.detect([s.jpeg for s in scenes[n : n + 2]]), scenes[n : n + 2])
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not failures, failures


def test_asyncio_session(server: RunningServer, scenes: list[Scene]) -> None:
    async def main() -> None:
        async with (
            AsyncInferClient(server.address, shm_dir=server.shm_dir) as client,
            client.session() as session,
        ):
            ids = await asyncio.gather(*(session.push([s.jpeg]) for s in scenes[:3]))
            for batch_id, scene in zip(ids, scenes[:3], strict=True):
                assert_answers([r async for r in session.results(batch_id)], [scene])
            with pytest.raises(InferError) as info:
                await session.push([b""])
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(main())
