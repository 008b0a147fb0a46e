"""``wait_ready`` waits through a health watch that fails UNAVAILABLE (a connection that died under it,
as when the server's front processes restart) and ends on any other error or at its timeout.

The server here is a real gRPC health service whose first watches fail as a dying connection's do.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infer_client import AsyncInferClient, InferClient, InferError


class FailingHealth(health_pb2_grpc.HealthServicer):
    """Fails the first ``failures`` watches with ``code``, then reports SERVING."""

    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures, self.code = failures, code
        self.watches = 0
        self._lock = threading.Lock()

    def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Iterator[object]:  # noqa: N802
        with self._lock:
            self.watches += 1
            failing = self.watches <= self.failures
        if failing:
            context.abort(self.code, "Stream removed (Socket closed)")
        yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@contextlib.contextmanager
def serving(health: FailingHealth) -> Iterator[str]:
    """``health`` served by a real gRPC server on a free port; its address."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_a_watch_that_fails_unavailable_is_watched_again() -> None:
    health = FailingHealth(failures=2, code=grpc.StatusCode.UNAVAILABLE)
    with serving(health) as address, InferClient(address, transport="inline") as client:
        client.wait_ready(timeout=None)  # no deadline: it waits as long as it takes
    assert health.watches == 3


def test_the_asyncio_client_watches_again_too() -> None:
    health = FailingHealth(failures=2, code=grpc.StatusCode.UNAVAILABLE)

    async def wait(address: str) -> None:
        async with AsyncInferClient(address, transport="inline") as client:
            await client.wait_ready(timeout=30)

    with serving(health) as address:
        asyncio.run(wait(address))
    assert health.watches == 3


def test_any_other_error_ends_the_wait_at_once() -> None:
    health = FailingHealth(failures=1, code=grpc.StatusCode.PERMISSION_DENIED)
    with (
        serving(health) as address,
        InferClient(address, transport="inline") as client,
        pytest.raises(InferError) as raised,
    ):
        client.wait_ready(timeout=30)
    assert raised.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert health.watches == 1


def test_a_server_that_stays_unavailable_ends_the_wait_at_its_timeout() -> None:
    health = FailingHealth(failures=10**6, code=grpc.StatusCode.UNAVAILABLE)
    with (
        serving(health) as address,
        InferClient(address, transport="inline") as client,
        pytest.raises(InferError) as raised,
    ):
        client.wait_ready(timeout=2)
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "not ready within 2s" in raised.value.message and "UNAVAILABLE" in raised.value.message
    assert raised.value.__context__ is None  # not raised inside gRPC's error: no second traceback
    # Watched again, with pauses between watches growing from 0.05 s (at most 7 fit in 2 s).
    assert 2 <= health.watches <= 8
