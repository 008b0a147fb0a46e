"""The result cache against a real server with the models: a repeat is answered from the cache,
identical to the first answer, without decode or inference (docs/performance.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engines.scenes import generate_scene
from infer_client import ImageResult
from tests.integration.conftest import running_server

SCENES = [generate_scene(seed, width=640, height=480).jpeg for seed in (301, 302, 303)]


def answer(result: ImageResult) -> dict[str, Any]:
    """What must be the same whether or not it came from the cache."""
    skip = ("batch_id", "index", "name", "timings_ms", "worker", "cached")
    return {k: v for k, v in result.to_dict().items() if k not in skip}


def test_a_repeat_is_answered_from_the_cache_exactly_as_the_first_time(model_repo_dir: Path) -> None:
    with running_server(model_repo_dir, "--result-cache-entries", "64", workers=1) as server:
        with server.client(transport="tmpfs") as client:
            first = client.detect(SCENES[:2], names=["a", "b"])
            again = {r.name: r for r in client.detect([SCENES[1], SCENES[2], SCENES[0]], names=["b2", "c", "a2"])}
        with server.client(transport="inline") as client:  # the key is the bytes, however they came
            inline = client.detect(SCENES, names=["a3", "b3", "c3"])
    assert [r.cached for r in first] == [False, False]
    assert (again["a2"].cached, again["b2"].cached, again["c"].cached) == (True, True, False)
    assert [r.cached for r in inline] == [True, True, True]
    assert (again["a2"].timings_ms, again["a2"].worker) == ({}, -1), "no worker ran"
    assert first[0].detections, "a scene with objects in it"
    for uncached, cached in ((first[0], again["a2"]), (first[1], again["b2"]), (again["c"], inline[2])):
        assert answer(cached) == answer(uncached)
    assert [(r.index, r.name) for r in inline] == [(0, "a3"), (1, "b3"), (2, "c3")]
