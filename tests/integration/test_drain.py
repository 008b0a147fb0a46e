"""SIGTERM drains: health turns NOT_SERVING, new pushes are refused, open streams get every result."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engines.scenes import Scene
from infer_client import InferError
from tests.integration.conftest import running_server


def test_sigterm_finishes_in_flight_batches(model_repo_dir: Path, scenes: list[Scene]) -> None:
    with running_server(model_repo_dir, workers=1) as srv, srv.client() as client:
        channel = grpc.insecure_channel(srv.address)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        batch_id = client.push([s.jpeg for s in scenes[:6]])
        stream = client.pull(batch_id)
        results = [next(stream)]  # the stream is open before the signal

        srv.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(InferError) as info:
            client.push([scenes[0].jpeg])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE and "not accepting" in info.value.message
        results += list(stream)
        assert sorted(r.index for r in results) == list(range(6)) and all(r.ok for r in results)
        assert srv.process.wait(timeout=60) == 0
        watch.cancel()
        channel.close()
