"""Hostile or malformed pushes are refused with a clear status, and the server keeps serving."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_proto import infer_pb2, infer_pb2_grpc
from tests.integration.conftest import RunningServer
from tests.integration.test_push_pull import spares_only


@pytest.fixture
def stub(server: RunningServer) -> Iterator[infer_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield infer_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture
def scratch(server: RunningServer) -> Iterator[Path]:
    """A directory inside the shared directory, removed again (teardown wants it empty)."""
    path = server.shm_dir / "scratch"
    path.mkdir()
    yield path
    for entry in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        entry.unlink() if entry.is_symlink() or not entry.is_dir() else entry.rmdir()
    path.rmdir()


def refused(stub: infer_pb2_grpc.InferenceServiceStub, **fields: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.PushData(infer_pb2.PushDataRequest(**fields), timeout=10)  # type: ignore[arg-type]
    return info.value.code(), info.value.details() or ""


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_path_outside_the_shared_directory(stub: infer_pb2_grpc.InferenceServiceStub, tmp_path: Path) -> None:
    outside = write(tmp_path / "b.bin", b"12345")
    for path in (str(outside), "../../etc/passwd", "/etc/passwd"):
        code, message = refused(stub, path=path, sizes=[5])
        assert (code, message) == (grpc.StatusCode.PERMISSION_DENIED, "path is outside the shared directory")


def test_symlink_is_refused(stub: infer_pb2_grpc.InferenceServiceStub, scratch: Path, scenes: list[Scene]) -> None:
    target = write(scratch / "real.bin", scenes[0].jpeg)
    (scratch / "link.bin").symlink_to(target)
    code, message = refused(stub, path=str(scratch / "link.bin"), sizes=[len(scenes[0].jpeg)])
    assert code == grpc.StatusCode.PERMISSION_DENIED and "symbolic" in message


def test_size_mismatch_and_writable_file(stub: infer_pb2_grpc.InferenceServiceStub, scratch: Path) -> None:
    f = write(scratch / "b.bin", b"x" * 999)
    assert refused(stub, path=str(f), sizes=[500, 500]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "sizes add up to 1000 bytes but the file holds 999",
    )
    f.chmod(0o666)
    code, _ = refused(stub, path=str(f), sizes=[999])
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_oversize_and_malformed_batches(stub: infer_pb2_grpc.InferenceServiceStub) -> None:
    assert refused(stub, data=b"x" * 257, sizes=[1] * 257)[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(stub, data=b"xx", sizes=[2, 0])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(stub, data=b"xx", sizes=[2**64 - 1])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(stub, path="b.bin", data=b"xx", sizes=[2])[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert refused(stub, sizes=[2])[0] == grpc.StatusCode.INVALID_ARGUMENT
    # Larger than the server's message limit: refused before it is parsed, as a request that can
    # never succeed (not RESOURCE_EXHAUSTED, which clients read as "retry later").
    code, message = refused(stub, data=b"x" * (65 * 1024 * 1024), sizes=[65 * 1024 * 1024])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.endswith(f"bytes is over the {64 * 1024 * 1024}-byte limit")


def test_staging_directory_is_off_limits(stub: infer_pb2_grpc.InferenceServiceStub, server: RunningServer) -> None:
    code, message = refused(stub, path=str(server.shm_dir / ".server" / "x.batch"), sizes=[5])
    assert code == grpc.StatusCode.PERMISSION_DENIED and "outside" not in message


def test_server_still_serves_after_refusals(server: RunningServer, scenes: list[Scene]) -> None:
    with server.client() as client:
        assert client.health()
        (result,) = client.detect([scenes[0].jpeg])
    assert result.ok
    assert spares_only(server.shm_dir / ".server")


def test_request_metadata_is_bounded_in_bytes(
    stub: infer_pb2_grpc.InferenceServiceStub, scratch: Path, scenes: list[Scene]
) -> None:
    """Findings: request_id had no bound (+8.9 MB of server memory per push); names were bounded in
    characters, not bytes; a huge path was parsed on the event loop before any check."""
    jpeg = scenes[0].jpeg
    batch = write(scratch / "meta.bin", jpeg)
    code, message = refused(stub, path=str(batch), sizes=[len(jpeg)], request_id="r" * 129)
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "request_id is longer than 128 bytes")
    code, message = refused(stub, path=str(batch), sizes=[len(jpeg)], names=["\U0001f600" * 300])  # 1200 bytes
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "name of image 0 is longer than 1024 bytes")
    code, message = refused(stub, path="a/" * 3000 + "b.bin", sizes=[len(jpeg)])
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "path is longer than 4096 bytes")


def test_a_request_id_is_bound_to_the_request_it_first_came_with(
    stub: infer_pb2_grpc.InferenceServiceStub, scratch: Path, scenes: list[Scene]
) -> None:
    """Finding: another client reusing a request_id, even with a path that does not exist, got the
    first client's batch id and could take its results. (A retry may come in a new file: the client
    library writes one per attempt.)"""
    jpeg = scenes[0].jpeg
    mine = write(scratch / "mine.bin", jpeg)
    first = stub.PushData(infer_pb2.PushDataRequest(path=str(mine), sizes=[len(jpeg)], request_id="req-17"))
    again = stub.PushData(infer_pb2.PushDataRequest(path=str(mine), sizes=[len(jpeg)], request_id="req-17"))
    assert again.batch_id == first.batch_id, "a true retry still gets the same batch"
    code, message = refused(stub, path=str(scratch / "nope.bin"), sizes=[len(jpeg) + 1], request_id="req-17")
    assert (code, message) == (
        grpc.StatusCode.ALREADY_EXISTS,
        "this request_id was already used for a different request",
    )
    results = list(stub.PullResult(infer_pb2.PullResultRequest(batch_ids=[first.batch_id]), timeout=120))
    assert [r.status.code for r in results] == [0], "the first client's result is still its own"


def test_hostile_jpegs_are_refused_from_their_headers(server: RunningServer, scenes: list[Scene]) -> None:
    """Findings: a tiny JPEG declaring 6000x6600 and a progressive JPEG repeating its scan thousands
    of times each held a worker for a minute or more; now each is a per-image INVALID_ARGUMENT."""
    import struct

    import cv2
    import numpy as np

    good = scenes[0].jpeg
    sof = good.index(b"\xff\xc0")
    liar = good[: sof + 5] + struct.pack(">HH", 6600, 6000) + good[sof + 9 :]
    image = cv2.imdecode(np.frombuffer(good, np.uint8), cv2.IMREAD_COLOR)
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    last = progressive.rindex(b"\xff\xda")
    scans = progressive[:-2] + progressive[last:-2] * 2000 + b"\xff\xd9"
    with server.client() as client:
        results = client.detect([liar, scans, good])
    assert [r.code for r in results] == [grpc.StatusCode.INVALID_ARGUMENT] * 2 + [grpc.StatusCode.OK]
    assert results[0].message.endswith("bytes is not a real JPEG")
    assert "scans (at most 100)" in results[1].message

