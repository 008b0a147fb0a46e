"""Admission control: beyond the in-flight bound a push is RESOURCE_EXHAUSTED, not queued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engines.scenes import Scene
from infer_client import InferError
from tests.integration.conftest import RunningServer, running_server


@pytest.fixture(scope="module")
def small_server(model_repo_dir: Path) -> Iterator[RunningServer]:
    limits = ("--max-inflight-images", "4", "--max-batch-images", "4")
    with running_server(model_repo_dir, *limits, workers=1) as srv:
        yield srv


def test_resource_exhausted_beyond_inflight_bound(small_server: RunningServer, scenes: list[Scene]) -> None:
    with small_server.client() as client:
        first = client.push([s.jpeg for s in scenes[:4]])  # fills the bound; takes one worker >0.5 s
        with pytest.raises(InferError) as info:
            client.push([scenes[4].jpeg])
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(InferError) as too_big:
            client.push([s.jpeg for s in scenes[:5]])
        assert too_big.value.code == grpc.StatusCode.INVALID_ARGUMENT  # can never fit: not retryable
        assert sorted(r.index for r in client.pull(first)) == [0, 1, 2, 3]
        # Capacity is released once the batch is answered.
        assert [r.ok for r in client.detect([s.jpeg for s in scenes[4:8]])] == [True] * 4
