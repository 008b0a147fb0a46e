"""``--null-model``: the pipeline that reads and header-checks images but runs no model."""

from __future__ import annotations

import struct

import pytest

from engines.scenes import generate_scene
from infer_server.messages import Code, ImageRef
from infer_server.settings import ServerSettings
from infer_server.stage.pipeline import NullPipeline
from tests.helpers import worker_options

SCENES = [generate_scene(seed, width=w, height=h) for seed, (w, h) in ((21, (1280, 720)), (22, (640, 480)))]


def test_answers_every_image_with_its_header_size_and_no_detections() -> None:
    good = SCENES[0].jpeg
    sof = good.index(b"\xff\xc0")
    huge = good[: sof + 5] + struct.pack(">HH", 3000, 3000) + good[sof + 9 :]
    blobs = [good, b"GIF89a....", huge, SCENES[1].jpeg]
    images = [(ImageRef(i, 0, len(b), f"img{i}"), b) for i, b in enumerate(blobs)]
    options = worker_options(max_image_pixels=2_000_000)
    outcomes = list(NullPipeline(options, worker_id=3).process("b", images, read_ms=8.0))
    assert [(o.index, o.name, o.code) for o in outcomes] == [
        (0, "img0", Code.OK),
        (1, "img1", Code.INVALID_ARGUMENT),
        (2, "img2", Code.INVALID_ARGUMENT),
        (3, "img3", Code.OK),
    ]
    assert outcomes[1].message == "image 1: not a JPEG or PNG"
    assert outcomes[2].message == "image 2: 3000x3000 exceeds the 2000000 pixel limit"
    assert [(o.width, o.height) for o in (outcomes[0], outcomes[3])] == [(1280, 720), (640, 480)]
    assert all(o.detections == () and o.worker == 3 and o.batch_images == 4 for o in outcomes)
    assert dict(outcomes[0].timings_ms) == {"read": pytest.approx(2.0)}
    queued = list(NullPipeline(options).process("b", images, read_ms=8.0, queue_ms=1.5))
    assert [dict(o.timings_ms) for o in queued][:2] == [{"read": pytest.approx(2.0), "queue": 1.5}, {}]


def test_is_off_by_default_and_set_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFER_NULL_MODEL", raising=False)
    assert ServerSettings().null_model is False
    monkeypatch.setenv("INFER_NULL_MODEL", "1")
    assert ServerSettings().null_model is True
