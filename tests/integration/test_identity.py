"""Callers with identities, against a real server (docs/security.md): who may push, who may read.

One server with a tokens file serves the module (null model: the data path is what is under
test). Each test is a finding of the adversarial review: a caller without credentials, another
caller taking or probing a batch, one caller's flood evicting another's results or holding every
stream, a root server reading another user's file for a caller (and telling its size), a
malformed or oversized message ending a whole session.
"""

from __future__ import annotations

import contextlib
import os
import queue
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engines.scenes import generate_scene
from infer_client import Credentials, InferClient, InferError
from infer_proto import infer_pb2, infer_pb2_grpc
from tests.integration.conftest import RunningServer, running_server

TOKENS = {name: f"{name}-{uuid.uuid4().hex}" for name in ("alice", "bob", "carol")}
OTHER_UID = 4321  # a user carol may push files of; nobody else may
RETAINED_PER_CALLER = 20
STREAMS_PER_CALLER = 3
IDLE_S = 3.0
MESSAGE_LIMIT = 64 << 20  # the default
JPEG = generate_scene(77, width=160, height=120).jpeg


@pytest.fixture(scope="module")
def server(model_repo_dir: Path) -> Iterator[RunningServer]:
    folder = Path(tempfile.mkdtemp(prefix="infer-identity-"))
    tokens = folder / "tokens"
    tokens.write_text(
        "# identity token [uids]\n"
        f"alice {TOKENS['alice']}\nbob {TOKENS['bob']}\ncarol {TOKENS['carol']} {os.geteuid()},{OTHER_UID}\n"
    )
    tokens.chmod(0o600)
    socket = folder / "infer.sock"
    args = [
        *("--null-model", "--tokens-file", str(tokens), "--unix-socket", str(socket)),
        *("--max-retained-batches-per-identity", str(RETAINED_PER_CALLER)),
        *("--max-streams-per-identity", str(STREAMS_PER_CALLER), "--stream-idle-timeout-s", str(IDLE_S)),
        *("--control-callers", "alice"),
    ]
    with running_server(model_repo_dir, *args, workers=1, credentials=as_("alice")) as srv:
        yield srv
    assert not socket.exists(), "the socket goes with the server"
    tokens.unlink()
    folder.rmdir()


def as_(name: str) -> Credentials:
    return Credentials(token=TOKENS[name])


def metadata(name: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[name]}"),)


@pytest.fixture
def stub(server: RunningServer) -> Iterator[infer_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield infer_pb2_grpc.InferenceServiceStub(channel)


def batch_file(server: RunningServer, data: bytes = JPEG, owner: int | None = None) -> Path:
    path = server.shm_dir / f"{uuid.uuid4().hex}.bin"
    path.write_bytes(data)
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def code_of(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call() if callable(call) else None
    return info.value.code(), info.value.details()


def inline(request_id: str = "") -> infer_pb2.PushDataRequest:
    return infer_pb2.PushDataRequest(data=JPEG, sizes=[len(JPEG)], request_id=request_id)


def pull(stub: infer_pb2_grpc.InferenceServiceStub, batch_id: str, caller: str) -> list[infer_pb2.ImageResult]:
    return list(
        stub.PullResult(infer_pb2.PullResultRequest(batch_ids=[batch_id]), metadata=metadata(caller), timeout=60)
    )


def test_a_call_without_a_known_token_is_refused(
    server: RunningServer, stub: infer_pb2_grpc.InferenceServiceStub
) -> None:
    request = infer_pb2.PullResultRequest(batch_ids=["x"])
    for credentials in ((), (("authorization", "Bearer not-a-token-of-anyone"),), (("authorization", "Basic x"),)):
        code, _ = code_of(lambda m=credentials: stub.PushData(inline(), metadata=m))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda m=credentials: list(stub.PullResult(request, metadata=m)))[0] == code
        assert code_of(lambda m=credentials: list(stub.Session(iter(()), metadata=m)))[0] == code
    with grpc.insecure_channel(server.address) as channel:  # probes carry no credentials
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    with server.client(credentials=as_("bob")) as client:
        assert [r.ok for r in client.detect([JPEG])] == [True]


def test_an_unknown_callers_push_is_refused_before_it_is_received(server: RunningServer) -> None:
    """Finding: inline data was received whole before anything was checked. Twelve 48 MB pushes
    without a token took the front +827 MB; refused from their headers, they take only what HTTP/2
    flow control had let in flight when the refusal reached the client: gRPC's window, tuned to the
    link in powers of two (1-9 MiB a connection measured on loopback, 16 possible), not the message.
    Hence the bound: well under the pushes' size (576 MiB), not near zero."""
    data = b"\xff" * (48 << 20)
    request = infer_pb2.PushDataRequest(data=data, sizes=[len(data)])
    before = peak_mib(server.process.pid)
    codes: list[grpc.StatusCode] = []

    def push() -> None:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", -1)]) as channel:
            codes.append(code_of(lambda: infer_pb2_grpc.InferenceServiceStub(channel).PushData(request, timeout=60))[0])

    threads = [threading.Thread(target=push) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 12
    assert peak_mib(server.process.pid) - before < len(threads) * len(data) / 2 / 2**20


def peak_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no VmHWM")


def test_another_callers_batch_cannot_be_pulled_or_probed(stub: infer_pb2_grpc.InferenceServiceStub) -> None:
    batch_id = stub.PushData(inline(), metadata=metadata("alice")).batch_id
    theirs = code_of(lambda: pull(stub, batch_id, "bob"))
    unknown = code_of(lambda: pull(stub, "f" * 32, "bob"))
    assert theirs[0] == unknown[0] == grpc.StatusCode.NOT_FOUND
    assert theirs[1].replace(batch_id, "ID") == unknown[1].replace("f" * 32, "ID"), "the same answer as an unknown id"
    assert [r.status.code for r in pull(stub, batch_id, "alice")] == [0], "the owner still gets every result"


def test_a_request_id_is_the_callers_own(stub: infer_pb2_grpc.InferenceServiceStub) -> None:
    """The same request_id (and the same request) from another caller is another batch: it can
    neither take the first caller's batch id nor block the first caller's retry."""
    request_id = uuid.uuid4().hex
    alices = stub.PushData(inline(request_id), metadata=metadata("alice")).batch_id
    bobs = stub.PushData(inline(request_id), metadata=metadata("bob")).batch_id
    assert bobs != alices
    assert stub.PushData(inline(request_id), metadata=metadata("alice")).batch_id == alices
    assert len(pull(stub, alices, "alice")) == len(pull(stub, bobs, "bob")) == 1


def test_one_callers_flood_does_not_evict_anothers_results(stub: infer_pb2_grpc.InferenceServiceStub) -> None:
    kept = stub.PushData(inline(), metadata=metadata("alice")).batch_id
    flood = [stub.PushData(inline(), metadata=metadata("bob")).batch_id for _ in range(3 * RETAINED_PER_CALLER)]
    for batch_id in flood[-RETAINED_PER_CALLER:]:  # every one of them finished
        pull(stub, batch_id, "bob")
    assert code_of(lambda: pull(stub, flood[0], "bob"))[0] == grpc.StatusCode.NOT_FOUND, "bob's own oldest went"
    assert len(pull(stub, kept, "alice")) == 1, "alice's unpulled results survive bob's flood"


def held_session(stub: infer_pb2_grpc.InferenceServiceStub, caller: str) -> tuple[Any, queue.SimpleQueue[Any]]:
    """A Session the server is running (it answered a first, empty push), then left idle; put None
    in the queue to half-close it."""
    requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
    requests.put(infer_pb2.SessionRequest(tag=1))
    call = stub.Session(iter(requests.get, None), metadata=metadata(caller), timeout=60)
    assert next(call).answers[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    return call, requests


def test_one_caller_cannot_hold_every_stream(server: RunningServer, stub: infer_pb2_grpc.InferenceServiceStub) -> None:
    held = [held_session(stub, "bob") for _ in range(STREAMS_PER_CALLER)]
    try:
        one_more = stub.Session(iter(()), metadata=metadata("bob"))
        assert code_of(lambda: list(one_more))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        with server.client(credentials=as_("alice")) as client:  # others still get streams
            assert [r.ok for r in client.detect([JPEG])] == [True]
        # An idle session ends on its own: the slots come back without bob closing anything.
        ended = [code_of(lambda c=call: list(c)) for call, _ in held]  # each waits for its end
        assert {code for code, _ in ended} == {grpc.StatusCode.UNAVAILABLE}
        assert all("idle" in detail for _, detail in ended)
        with server.client(credentials=as_("bob")) as client:
            assert [r.ok for r in client.detect([JPEG])] == [True]
    finally:
        for call, requests in held:
            requests.put(None)
            call.cancel()


def test_a_file_is_read_only_for_a_caller_allowed_its_owner(
    server: RunningServer, stub: infer_pb2_grpc.InferenceServiceStub
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    theirs = batch_file(server, owner=OTHER_UID)
    missing = server.shm_dir / "no-such-file.bin"
    try:
        refused = {}
        for path, sizes in ((theirs, [len(JPEG)]), (theirs, [len(JPEG) + 1]), (missing, [len(JPEG)])):
            request = infer_pb2.PushDataRequest(path=str(path), sizes=sizes)
            refused[(path, sizes[0])] = code_of(lambda r=request: stub.PushData(r, metadata=metadata("alice")))
        assert len(set(refused.values())) == 1, f"size and existence must not show: {refused}"
        assert next(iter(refused.values()))[0] == grpc.StatusCode.PERMISSION_DENIED
        request = infer_pb2.PushDataRequest(path=str(theirs), sizes=[len(JPEG)])
        batch_id = stub.PushData(request, metadata=metadata("carol")).batch_id  # carol may push that user's files
        assert [r.status.code for r in pull(stub, batch_id, "carol")] == [0]
    finally:
        theirs.unlink()


def test_a_malformed_or_oversized_push_fails_alone(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as channel:
        raw_push = channel.unary_unary("/infer.v1.InferenceService/PushData")
        raw_session = channel.stream_stream(
            "/infer.v1.InferenceService/Session", response_deserializer=infer_pb2.SessionReply.FromString
        )
        code, detail = code_of(lambda: raw_push(b"\x12\xff\xff", metadata=metadata("alice")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "PushDataRequest" in detail
        code, detail = code_of(lambda: raw_push(b"\x00" * (MESSAGE_LIMIT + 100), metadata=metadata("alice")))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit" in detail, (
            "not RESOURCE_EXHAUSTED: retrying cannot help"
        )
        good = infer_pb2.SessionRequest(tag=3, push=inline()).SerializeToString()
        oversized = infer_pb2.SessionRequest(tag=2, push=inline()).SerializeToString() + b"\x00" * MESSAGE_LIMIT
        pushes = iter([b"\x08\x01\x12\xff\xff", oversized, good])
        replies = list(raw_session(pushes, metadata=metadata("alice"), timeout=60))
    answers = {a.tag: a for r in replies for a in r.answers}
    assert answers[1].status.code == answers[2].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert answers[3].status.code == 0 and answers[3].batch_id, "the session went on"
    assert [r.status.code for reply in replies for r in reply.results] == [0]


def test_the_unix_socket_is_private_and_asks_for_credentials_too(server: RunningServer) -> None:
    socket = next(Path(a) for a in server.process.args if str(a).endswith("infer.sock"))  # type: ignore[union-attr]
    mode = os.stat(socket).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    with InferClient(f"unix:{socket}", shm_dir=server.shm_dir, credentials=as_("alice")) as client:
        assert client.transport == "tmpfs"
        assert [r.ok for r in client.detect([JPEG])] == [True]
    with InferClient(f"unix:{socket}", shm_dir=server.shm_dir) as client, pytest.raises(InferError) as info:
        client.detect([JPEG])
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_the_health_command_needs_no_token(server: RunningServer) -> None:
    socket = next(str(a) for a in server.process.args if str(a).endswith("infer.sock"))  # type: ignore[union-attr]
    for address in (server.address, f"unix:{socket}"):
        done = subprocess.run([sys.executable, "-m", "infer_server", "health", "--address", address],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert (done.returncode, done.stdout.strip()) == (0, f"{address}: SERVING"), done.stderr


def test_only_named_callers_change_models(server: RunningServer) -> None:
    """Every caller may list the models; changing them takes an identity in --control-callers."""
    with grpc.insecure_channel(server.address) as channel:
        control = infer_pb2_grpc.ModelControlServiceStub(channel)
        load = infer_pb2.LoadModelRequest(name="nonesuch")
        assert code_of(lambda: control.LoadModel(load))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(lambda: control.ListModels(infer_pb2.ListModelsRequest()))[0] == grpc.StatusCode.UNAUTHENTICATED
        control.ListModels(infer_pb2.ListModelsRequest(), metadata=metadata("bob"))
        for rpc, request in [
            (control.LoadModel, load),
            (control.UnloadModel, infer_pb2.UnloadModelRequest(name="color")),
            (control.RollbackModel, infer_pb2.RollbackModelRequest(name="color")),
            (control.SetCanary, infer_pb2.TrialRequest(name="color", version="2", share=0.5)),
            (control.SetShadow, infer_pb2.TrialRequest(name="color", version="2", share=0.5)),
        ]:
            code, details = code_of(lambda rpc=rpc, request=request: rpc(request, metadata=metadata("bob")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "bob" in details
        assert code_of(lambda: control.LoadModel(load, metadata=metadata("alice")))[0] == grpc.StatusCode.NOT_FOUND


def test_the_open_inference_protocol_asks_the_same_questions(server: RunningServer) -> None:
    """Finding: its calls were not identified before their message was read, its streams were not
    counted (idle ones took every RPC slot), and its finished batches pushed out unpulled results."""
    from infer_proto import inference_pb2, inference_pb2_grpc

    request = inference_pb2.ModelInferRequest(model_name="pipeline")
    request.raw_input_contents.append(len(JPEG).to_bytes(4, "little") + JPEG)
    request.inputs.add(name="IMAGES", datatype="BYTES", shape=[1])
    with grpc.insecure_channel(server.address) as channel:
        oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert oip.ServerLive(inference_pb2.ServerLiveRequest()).live, "probes need no credentials"
        assert code_of(lambda: oip.ModelInfer(request))[0] == grpc.StatusCode.UNAUTHENTICATED
        with server.client(credentials=as_("carol")) as client:
            kept = client.push([JPEG])
        for _ in range(RETAINED_PER_CALLER + 5):  # more requests than carol may keep finished batches
            assert oip.ModelInfer(request, metadata=metadata("carol")).outputs[0].name == "DETECTIONS"
        assert len(pull(infer_pb2_grpc.InferenceServiceStub(channel), kept, "carol")) == 1
        feeds: list[queue.Queue[Any]] = [queue.Queue() for _ in range(STREAMS_PER_CALLER + 1)]
        calls = [oip.ModelStreamInfer(iter(feed.get, None), metadata=metadata("bob")) for feed in feeds]
        try:
            for feed, call in zip(feeds[:-1], calls[:-1], strict=True):
                feed.put(request)
                assert next(call).infer_response.outputs, "open and answering"
            feeds[-1].put(request)
            assert code_of(lambda: next(calls[-1]))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for feed, call in zip(feeds, calls, strict=True):
                feed.put(None)
                call.cancel()


def _target(descriptor: Path) -> str | None:
    """What a process's descriptor (``/proc/PID/fd/N``) opens; None if it was closed meanwhile (the
    server closes descriptors while the directory is listed)."""
    try:
        return os.readlink(descriptor)
    except FileNotFoundError:
        return None


def test_calls_cancelled_while_their_region_is_read_leave_no_descriptor(server: RunningServer) -> None:
    """Finding: a call cancelled while the server read its region's layout left the file open for good."""
    from infer_proto import inference_pb2, inference_pb2_grpc

    images = 64
    region = server.shm_dir / "cancelled-region"
    region.write_bytes((len(JPEG).to_bytes(4, "little") + JPEG) * images)
    region.chmod(0o600)
    size = region.stat().st_size
    request = inference_pb2.ModelInferRequest(model_name="pipeline")
    tensor = request.inputs.add(name="IMAGES", datatype="BYTES", shape=[images])
    tensor.parameters["shared_memory_region"].string_param = "many"
    tensor.parameters["shared_memory_byte_size"].int64_param = size
    try:
        with grpc.insecure_channel(server.address) as channel:
            oip = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            oip.SystemSharedMemoryRegister(inference_pb2.SystemSharedMemoryRegisterRequest(
                name="many", key="/" + region.name, byte_size=size), metadata=metadata("alice"))  # fmt: skip
            for n in range(300):
                with contextlib.suppress(grpc.RpcError):
                    oip.ModelInfer(request, timeout=0.0005 * (1 + n % 8), metadata=metadata("alice"))
            assert oip.ModelInfer(request, metadata=metadata("alice")).outputs, "the server answers again"
            oip.SystemSharedMemoryUnregister(
                inference_pb2.SystemSharedMemoryUnregisterRequest(name="many"), metadata=metadata("alice")
            )
        fds = Path(f"/proc/{server.process.pid}/fd")
        held = [fd for fd in fds.iterdir() if _target(fd) == os.path.realpath(region)]
        assert held == [], f"{len(held)} descriptors of the region's file are still held"
    finally:
        region.unlink()
