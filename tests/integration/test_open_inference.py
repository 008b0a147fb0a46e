"""The Open Inference Protocol beside infer.v1: Triton's own client, unmodified and in its own
virtualenv, gets the same detections as infer.v1 for the same images (inline bytes, system
shared memory, async, stream); the hostile cases of Triton's shared-memory CVEs are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from benchmarks import perf_analyzer
from engines.scenes import generate_scene
from infer_proto import inference_pb2, inference_pb2_grpc
from tests.helpers import MODELS
from tests.integration.conftest import RunningServer, running_server

ROOT = Path(__file__).resolve().parents[2]
TRITON_PYTHON = ROOT / ".venv-triton" / "bin" / "python"
CLIENT = Path(__file__).resolve().parent / "oip" / "triton_client.py"


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    # Triton's clients make their regions with shm_open, in /dev/shm itself: that is the shared
    # directory; the server's staging directory is one of this run's own.
    staging = Path(tempfile.mkdtemp(prefix="oip-staging-", dir="/dev/shm"))
    try:
        # Root (as in CI) writes outputs into nobody's files unless told whose: here root's own.
        args = ("--shm-dir", "/dev/shm", "--staging-dir", str(staging / "s"))
        args += ("--region-write-owners", str(os.geteuid()))
        with running_server(MODELS, *args, workers=2) as srv:
            yield srv
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("oip")
    paths = []
    for seed in (31, 32, 33):
        paths.append(folder / f"{seed}.jpg")
        paths[-1].write_bytes(generate_scene(seed).jpeg)
    paths.append(folder / "broken.jpg")
    paths[-1].write_bytes(b"\xff\xd8 not a jpeg")
    return paths


def ours(server: RunningServer, images: list[Path]) -> list[dict]:  # type: ignore[type-arg]
    """What infer.v1 answers for the same images, in the protocol's JSON form."""
    with server.client(transport="inline") as client:
        results = client.detect([p.read_bytes() for p in images])
    return [
        {"status": r.code.value[0], "detections": [
            {"label": d.label, "box": [round(v, 3) for v in d.box.as_tuple()], "score": round(d.score, 5),
             "attributes": {m: a.label for m, a in d.attributes.items()}} for d in r.detections]}  # fmt: skip
        for r in results
    ]


def comparable(doc: dict) -> dict:  # type: ignore[type-arg]
    return {"status": doc["status"]["code"], "detections": [
        {"label": d["label"], "box": [round(v, 3) for v in d["box"]], "score": round(d["score"], 5),
         "attributes": {m: a["label"] for m, a in d["attributes"].items()}} for d in doc["detections"]]}  # fmt: skip


def test_tritonclient_gets_what_infer_v1_answers(server: RunningServer, images: list[Path]) -> None:
    if not TRITON_PYTHON.exists():
        pytest.fail("no .venv-triton: `make test` installs Triton's client there (requirements/triton.txt)")
    done = subprocess.run([str(TRITON_PYTHON), str(CLIENT), server.address, *map(str, images)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert (out["live"], out["ready"], out["model_ready"]) == (True, True, True)
    assert out["inputs"] == [["IMAGES", "BYTES"]] and "DETECTIONS" in out["outputs"]
    assert out["config"] == ["pipeline", "IMAGES", "TYPE_STRING"]
    expected = ours(server, images)
    assert expected[0]["detections"] and expected[3]["status"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for way in ("inline", "shm", "async", "stream"):
        assert [comparable(d) for d in out[way]] == expected, way
    assert out["count"] == out["shm_count"] == [len(e["detections"]) for e in expected]
    assert out["boxes_shape"] == [4, max(out["count"]), 4]
    assert out["regions"] == ["images"]
    assert int(out["statistics"]) >= 3 * 4


@pytest.fixture
def stub(server: RunningServer) -> Iterator[inference_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield inference_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
def region_file() -> Iterator[Path]:
    """A region's file as a client makes it (0600, in the shared directory): one image, serialized."""
    jpeg = generate_scene(34).jpeg
    path = Path("/dev/shm") / f"oip-hostile-{os.getpid()}"
    path.write_bytes(len(jpeg).to_bytes(4, "little") + jpeg)
    path.chmod(0o600)
    yield path
    for leftover in (path, path.with_name(path.name + "-link")):
        leftover.unlink(missing_ok=True)


def refused(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call() if callable(call) else None
    return info.value.code(), info.value.details()


def register(stub: inference_pb2_grpc.GRPCInferenceServiceStub, name: str, key: str, offset: int = 0,
             size: int = 0) -> object:  # fmt: skip
    return stub.SystemSharedMemoryRegister(
        inference_pb2.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=size)
    )


def infer_from(stub: inference_pb2_grpc.GRPCInferenceServiceStub, region: str, offset: int, size: int) -> object:
    request = inference_pb2.ModelInferRequest(model_name="pipeline")
    tensor = request.inputs.add(name="IMAGES", datatype="BYTES", shape=[1])
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_offset"].int64_param = offset
    tensor.parameters["shared_memory_byte_size"].int64_param = size
    return stub.ModelInfer(request)


def test_a_region_outside_the_shared_directory_or_through_a_symlink_is_refused(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    """CVE-2025-23319/23320 class: a key reaching files the server's user may read."""
    for key in ("/../etc/passwd", "../../etc/passwd", "/proc/self/environ", "/etc/passwd", "/"):
        code, _ = refused(lambda k=key: register(stub, "r", k, 0, 4))
        assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT), key
    link = region_file.with_name(region_file.name + "-link")
    link.symlink_to("/etc/passwd")
    code, details = refused(lambda: register(stub, "r", "/" + link.name, 0, 4))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "outside the shared directory" in details
    link.unlink()
    link.symlink_to(region_file)  # even to a file that could be registered itself
    code, details = refused(lambda: register(stub, "r", "/" + link.name, 0, 4))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "symbolic link" in details


def test_offsets_and_sizes_are_checked_without_wrapping(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    """CVE-2024-0088 class: unchecked offset + size, and a sum that wraps around."""
    size, key = region_file.stat().st_size, "/" + region_file.name
    for offset, byte_size in ((0, size + 1), (size, 1), (2**64 - 1, 2), (1, 2**64 - 1)):
        code, _ = refused(lambda o=offset, b=byte_size: register(stub, "r", key, o, b))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (offset, byte_size)
    register(stub, "r", key, 0, size)
    try:
        for offset, byte_size in ((0, size + 1), (size - 1, 2), (-1, 4), (0, -1), (2**63 - 1, 2**63 - 1)):
            code, _ = refused(lambda o=offset, b=byte_size: infer_from(stub, "r", o, b))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (offset, byte_size)
        answer = infer_from(stub, "r", 0, size)
        assert answer.outputs[0].name == "DETECTIONS"  # type: ignore[attr-defined]
    finally:
        stub.SystemSharedMemoryUnregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name="r"))


def test_an_unregistered_or_replaced_region_is_refused_clearly(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    size, key = region_file.stat().st_size, "/" + region_file.name
    register(stub, "r", key, 0, size)
    stub.SystemSharedMemoryUnregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name="r"))
    code, details = refused(lambda: infer_from(stub, "r", 0, size))
    assert code == grpc.StatusCode.NOT_FOUND and "no shared memory region" in details
    register(stub, "r", key, 0, size)
    data = region_file.read_bytes()
    region_file.unlink()
    region_file.write_bytes(data)  # another file at the same name now
    region_file.chmod(0o600)
    code, details = refused(lambda: infer_from(stub, "r", 0, size))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "replaced" in details
    code, _ = refused(lambda: stub.SystemSharedMemoryStatus(inference_pb2.SystemSharedMemoryStatusRequest(name="r")))
    assert code == grpc.StatusCode.NOT_FOUND, "the region went with its file"


def test_calls_not_served_say_so(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/RepositoryIndex")
        code, details = refused(lambda: call(b""))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "RepositoryIndex is not served" in details


def test_requests_the_server_cannot_honour_are_refused_not_misread(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, server: RunningServer
) -> None:
    jpeg = generate_scene(35).jpeg
    raw = len(jpeg).to_bytes(4, "little") + jpeg
    into_shm = inference_pb2.ModelInferRequest(model_name="pipeline", raw_input_contents=[raw])
    into_shm.inputs.add(name="IMAGES", datatype="BYTES", shape=[1])
    into_shm.outputs.add(name="COUNT").parameters["shared_memory_region"].string_param = "out"
    code, details = refused(lambda: stub.ModelInfer(into_shm))
    assert code == grpc.StatusCode.NOT_FOUND and "no shared memory region" in details, "never silently ignored"
    both = inference_pb2.ModelInferRequest(model_name="pipeline", raw_input_contents=[raw])
    both.inputs.add(name="IMAGES", datatype="BYTES", shape=[1]).contents.bytes_contents.append(jpeg)
    assert refused(lambda: stub.ModelInfer(both))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert not stub.ModelReady(inference_pb2.ModelReadyRequest(name="pipeline", version="7")).ready
    assert stub.ModelReady(inference_pb2.ModelReadyRequest(name="pipeline", version="1")).ready
    with grpc.insecure_channel(server.address) as channel:
        garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        assert refused(lambda: garbage(b"\xff\xff\xff"))[0] == grpc.StatusCode.INVALID_ARGUMENT


def test_a_range_outside_the_region_is_refused_even_inside_the_file(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    """The region is a window of its file: reading past the window is refused by the region's own bound."""
    size, key = region_file.stat().st_size, "/" + region_file.name
    register(stub, "w", key, 4, size - 8)
    try:
        code, details = refused(lambda: infer_from(stub, "w", 0, size - 4))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside region" in details
    finally:
        stub.SystemSharedMemoryUnregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name="w"))


def test_an_output_goes_into_its_region_only_if_it_fits(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    size, key = region_file.stat().st_size, "/" + region_file.name
    image = region_file.read_bytes()
    out = region_file.with_name(region_file.name + "-out")
    out.write_bytes(b"\xff" * 64)
    out.chmod(0o600)
    register(stub, "in", key, 0, size)
    register(stub, "out", "/" + out.name, 0, 64)
    try:
        request = inference_pb2.ModelInferRequest(model_name="pipeline")
        tensor = request.inputs.add(name="IMAGES", datatype="BYTES", shape=[1])
        tensor.parameters["shared_memory_region"].string_param = "in"
        tensor.parameters["shared_memory_byte_size"].int64_param = size
        wanted = request.outputs.add(name="STATUS")
        wanted.parameters["shared_memory_region"].string_param = "out"
        wanted.parameters["shared_memory_offset"].int64_param = 8
        wanted.parameters["shared_memory_byte_size"].int64_param = 4
        answer = stub.ModelInfer(request)
        assert answer.outputs[0].parameters["shared_memory_region"].string_param == "out"
        assert answer.raw_output_contents == [b""]
        written = out.read_bytes()
        assert written[8:12] == (0).to_bytes(4, "little"), "STATUS 0 (OK) at the offset asked for"
        assert written[:8] + written[12:] == b"\xff" * 60, "nothing else of the region is touched"
        request.outputs[0].name = "DETECTIONS"  # far more than 4 bytes of JSON
        code, details = refused(lambda: stub.ModelInfer(request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "needs" in details
        assert image == region_file.read_bytes(), "the input region is never written"
    finally:
        for name in ("in", "out"):
            stub.SystemSharedMemoryUnregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name=name))
        out.unlink()


def test_a_region_is_a_window_at_its_offset_for_reads_and_writes(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    """Finding: with every region at offset 0, ignoring a region's offset went unnoticed."""
    element = region_file.read_bytes()
    padded = region_file.with_name(region_file.name + "-padded")
    padded.write_bytes(b"J" * 16 + element + b"J" * 16)
    padded.chmod(0o600)
    try:
        register(stub, "win", "/" + padded.name, 16, len(element) + 8)
        request = inference_pb2.ModelInferRequest(model_name="pipeline")
        tensor = request.inputs.add(name="IMAGES", datatype="BYTES", shape=[1])
        tensor.parameters["shared_memory_region"].string_param = "win"
        tensor.parameters["shared_memory_byte_size"].int64_param = len(element)
        wanted = request.outputs.add(name="COUNT")
        wanted.parameters["shared_memory_region"].string_param = "win"
        wanted.parameters["shared_memory_offset"].int64_param = len(element)
        wanted.parameters["shared_memory_byte_size"].int64_param = 4
        stub.ModelInfer(request)
        after = padded.read_bytes()
        assert after[:16] == b"J" * 16 and after[16 : 16 + len(element)] == element, "read in place, not written"
        count = int.from_bytes(after[16 + len(element) : 20 + len(element)], "little")
        assert count > 0 and after[20 + len(element) :] == b"J" * 12, "COUNT at the region's offset, nothing more"
    finally:
        stub.SystemSharedMemoryUnregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name="win"))
        padded.unlink()


def test_outputs_never_go_into_a_file_its_owner_may_not_write(
    stub: inference_pb2_grpc.GRPCInferenceServiceStub, region_file: Path
) -> None:
    """Finding: the server writes with its own rights (root's, here): a 0400 file was written."""
    size, key = region_file.stat().st_size, "/" + region_file.name
    before = region_file.read_bytes()
    region_file.chmod(0o400)
    register(stub, "ro", key, 0, size)
    try:
        request = inference_pb2.ModelInferRequest(model_name="pipeline", raw_input_contents=[before])
        request.inputs.add(name="IMAGES", datatype="BYTES", shape=[1])
        wanted = request.outputs.add(name="STATUS")
        wanted.parameters["shared_memory_region"].string_param = "ro"
        wanted.parameters["shared_memory_byte_size"].int64_param = 4
        code, details = refused(lambda: stub.ModelInfer(request))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "may write" in details
        assert region_file.read_bytes() == before
    finally:
        stub.SystemSharedMemoryUnregister(inference_pb2.SystemSharedMemoryUnregisterRequest(name="ro"))


def test_cuda_shared_memory_has_nothing_to_list_or_drop(stub: inference_pb2_grpc.GRPCInferenceServiceStub,
                                                         server: RunningServer) -> None:  # fmt: skip
    """Load tools unregister every region, CUDA's too, when they finish: that succeeds (there is
    none); a named one is unknown, and registering one is not served."""
    assert not stub.CudaSharedMemoryStatus(inference_pb2.CudaSharedMemoryStatusRequest()).regions
    stub.CudaSharedMemoryUnregister(inference_pb2.CudaSharedMemoryUnregisterRequest())
    code, details = refused(lambda: stub.CudaSharedMemoryUnregister(
        inference_pb2.CudaSharedMemoryUnregisterRequest(name="gpu0")))  # fmt: skip
    assert code == grpc.StatusCode.NOT_FOUND and "gpu0" in details
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/CudaSharedMemoryRegister")
        assert refused(lambda: call(b""))[0] == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("shared_memory", ["none", "system"])
def test_perf_analyzer_measures_the_server_unmodified(
    server: RunningServer, stub: inference_pb2_grpc.GRPCInferenceServiceStub, tmp_path: Path, shared_memory: str
) -> None:
    """Triton's load tool runs its documented command (benchmarks/README.md) to the end: requests
    answered, the server's statistics split into queue and compute as it reads them, every region it
    registered (inputs and all six outputs) unregistered again."""
    try:
        perf_analyzer.environment()
    except FileNotFoundError as exc:
        pytest.fail(f"{exc} (`make test` installs it)")
    before = stub.ModelStatistics(inference_pb2.ModelStatisticsRequest(name="pipeline")).model_stats[0]
    data = perf_analyzer.input_data([generate_scene(seed).jpeg for seed in (36, 37)], 1, tmp_path / "images.json")
    done = perf_analyzer.run(server.address, data, shared_memory=shared_memory, concurrency=2, interval_ms=1500,
                             stability=999)  # fmt: skip
    assert done["returncode"] == 0, done["output"][-3000:]
    assert float(done["row"]["Inferences/Second"]) > 0
    assert "Unable to unregister" not in done["output"] and "error" not in done["output"].lower()
    after = stub.ModelStatistics(inference_pb2.ModelStatisticsRequest(name="pipeline")).model_stats[0]
    answered = after.inference_stats.success.count - before.inference_stats.success.count
    assert answered > 0 and after.inference_stats.queue.count - before.inference_stats.queue.count == answered
    assert after.inference_stats.compute_infer.ns > before.inference_stats.compute_infer.ns
    assert not stub.SystemSharedMemoryStatus(inference_pb2.SystemSharedMemoryStatusRequest()).regions
