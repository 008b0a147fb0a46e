"""Every result says which version of each model produced it, from a versioned repository."""

from __future__ import annotations

from pathlib import Path

from engines.scenes import generate_scene
from tests.helpers import versioned_repository
from tests.integration.conftest import running_server


def test_results_name_the_versions_that_answered(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1, 2), {"latest": 1})
    with running_server(root, workers=1) as server, server.client() as client:
        results = client.detect([generate_scene(41).jpeg, b"not an image"])
    assert dict(results[0].model_versions) == {"detector": "1", "color": "2", "vehicle_type": "1"}
    assert results[0].detections and not results[1].ok
    assert dict(results[1].model_versions) == {}, "no model ran on an image refused before decoding"
