"""Every push leaves one structured audit line, whatever its verdict, and none carries a path."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_proto import infer_pb2, infer_pb2_grpc
from tests.integration.conftest import RunningServer


def audit_lines(server: RunningServer, after: int) -> list[dict]:
    lines = server.log_path.read_text(errors="replace").splitlines()[after:]
    return [json.loads(line.split("infer_server.audit: ", 1)[1]) for line in lines if "infer_server.audit: " in line]


def test_accepted_retried_and_refused_pushes_are_audited(server: RunningServer, scenes: list[Scene]) -> None:
    start = len(server.log_path.read_text(errors="replace").splitlines())
    jpeg = scenes[0].jpeg
    path = Path(server.shm_dir) / "audited.bin"
    path.write_bytes(jpeg)
    path.chmod(0o600)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = infer_pb2_grpc.InferenceServiceStub(channel)
            request = infer_pb2.PushDataRequest(path=str(path), sizes=[len(jpeg)], request_id="audit-1")
            first = stub.PushData(request)
            stub.PushData(request)
            with pytest.raises(grpc.RpcError):
                stub.PushData(infer_pb2.PushDataRequest(path="/etc/shadow", sizes=[10]))
            list(stub.PullResult(infer_pb2.PullResultRequest(batch_ids=[first.batch_id]), timeout=120))
    finally:
        path.unlink()
    # Each line is written (and flushed) before its push is answered: no waiting needed.
    lines = [e for e in audit_lines(server, start) if e["event"] == "push"]
    accepted, retry, refused = lines
    assert accepted | {"peer": None} == {
        "event": "push", "peer": None, "identity": "anonymous", "transport": "tmpfs", "images": 1, "bytes": len(jpeg),
        "request_id": True, "verdict": "accepted", "batch_id": first.batch_id,
    }
    assert accepted["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    assert (retry["verdict"], retry["batch_id"]) == ("retry", first.batch_id)
    assert (refused["verdict"], refused["code"], refused["reason"]) == (
        "refused", "PERMISSION_DENIED", "path is outside the shared directory"
    )
    assert not any("shadow" in json.dumps(e) or str(path) in json.dumps(e) for e in lines), "no paths"
