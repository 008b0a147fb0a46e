"""The per-chunk vision pipeline of a worker, run in-process on the repository's models."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from engines.scenes import generate_scene
from infer_server.messages import STAGES, Code, ImageOutcome, ImageRef
from infer_server.stage.model_repo import ModelRepository
from infer_server.stage.pipeline import VisionPipeline
from tests.helpers import worker_options

SCENES = [generate_scene(seed) for seed in (11, 12, 13)]


def run(pipeline: VisionPipeline, blobs: list[bytes], read_ms: float = 0.0) -> list[ImageOutcome]:
    """The outcomes of one chunk, by image index (the pipeline yields them as they are final)."""
    images = [(ImageRef(i, 0, len(b), f"img{i}"), b) for i, b in enumerate(blobs)]
    return sorted(pipeline.process("b", images, read_ms), key=lambda o: o.index)


def write_grid_detector(path: Path, config: dict, seed: int = 0) -> None:
    """A real (tiny) DetectNet_v2-shaped ONNX model: coverage from a random stride-16 convolution of
    the image, every cell predicting a 21 px box around its centre. Unlike random ResNet weights it
    yields valid boxes of every class, which is what the routing tests need."""
    n, stride = len(config["labels"]), config["decode"]["stride"]
    rng = np.random.default_rng(seed)
    w_cov = rng.normal(0, 0.02, (n, 3, stride, stride)).astype(np.float32)
    w_box, b_box = np.zeros((4 * n, 3, stride, stride), np.float32), np.full(4 * n, 0.3, np.float32)
    conv = {"kernel_shape": [stride, stride], "strides": [stride, stride]}
    x, cov, box = config["input"]["name"], config["outputs"]["coverage"], config["outputs"]["bbox"]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", [x, "w_cov"], ["logits"], **conv),
            helper.make_node("Sigmoid", ["logits"], [cov]),
            helper.make_node("Conv", [x, "w_box", "b_box"], [box], **conv),
        ],
        "grid_detector",
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 3, None, None])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (cov, box)],
        [numpy_helper.from_array(w_cov, "w_cov"), numpy_helper.from_array(w_box, "w_box"),
         numpy_helper.from_array(b_box, "b_box")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.save(model, path)


def repo_with_grid_detector(src: Path, dst: Path, max_detections: int) -> Path:
    """``src``'s classifiers (linked) and config, with ``write_grid_detector`` as the detector."""
    for model_dir in src.iterdir():
        if not (model_dir / "config.yaml").is_file():
            continue
        (dst / model_dir.name).mkdir(parents=True)
        config = yaml.safe_load((model_dir / "config.yaml").read_text())
        if config["kind"] == "detector":
            config["decode"].update(confidence_threshold=0.0, max_detections=max_detections)
            write_grid_detector(dst / model_dir.name / "model.onnx", config)
        else:
            (dst / model_dir.name / "model.onnx").symlink_to(model_dir / "model.onnx")
        (dst / model_dir.name / "config.yaml").write_text(yaml.safe_dump(config))
    return dst


@pytest.fixture(scope="module")
def pipeline(model_repo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VisionPipeline]:
    repo = repo_with_grid_detector(model_repo_dir, tmp_path_factory.mktemp("repo"), max_detections=6)
    p = VisionPipeline.load(repo, worker_options(batch_size=4, max_image_pixels=2_000_000))
    p.warm_up()
    yield p
    p.close()


def test_every_detection_gets_the_attributes_routed_to_its_class(pipeline: VisionPipeline) -> None:
    outcomes = run(pipeline, [s.jpeg for s in SCENES], read_ms=3.0)
    repo = pipeline.repo
    labels: set[str] = set()
    assert [(o.index, o.name, o.code) for o in outcomes] == [(i, f"img{i}", Code.OK) for i in range(3)]
    for o, scene in zip(outcomes, SCENES, strict=True):
        assert (o.width, o.height) == (scene.width, scene.height)
        assert len(o.detections) == 6
        assert [d.score for d in o.detections] == sorted((d.score for d in o.detections), reverse=True)
        for d in o.detections:
            assert d.label == repo.detector.config.labels[d.class_id]
            assert 0 <= d.box.x1 <= d.box.x2 <= scene.width and 0 <= d.box.y1 <= d.box.y2 <= scene.height
            routed = repo.classifiers_for(d.label)
            assert [a.model for a in d.attributes] == [c.config.name for c in routed]
            for a, c in zip(d.attributes, routed, strict=True):
                assert a.label in c.config.labels and 0 < a.score <= 1
        labels.update(d.label for d in o.detections)
        timings = dict(o.timings_ms)
        assert list(timings) == list(STAGES)
        assert timings["read"] == pytest.approx(1.0) and timings["detector"] > 0 and timings["crop"] > 0
    assert len(labels) >= 2, "the grid detector reports several classes, so routing is exercised"


def test_bad_images_fail_alone_with_a_clear_reason(pipeline: VisionPipeline) -> None:
    good = SCENES[0].jpeg
    sof = good.index(b"\xff\xc0")
    huge = good[: sof + 5] + struct.pack(">HH", 3000, 3000) + good[sof + 9 :]
    blobs = [good, b"GIF89a....", good[: len(good) // 2], huge, b"", SCENES[1].jpeg]
    outcomes = run(pipeline, blobs)
    assert [(o.index, o.code, o.message) for o in outcomes] == [
        (0, Code.OK, ""),
        (1, Code.INVALID_ARGUMENT, "image 1: not a JPEG or PNG"),
        (2, Code.INVALID_ARGUMENT, "image 2: corrupt or truncated image data"),
        (3, Code.INVALID_ARGUMENT, "image 3: 3000x3000 exceeds the 2000000 pixel limit"),
        (4, Code.INVALID_ARGUMENT, "image 4: empty image"),
        (5, Code.OK, ""),
    ]
    assert outcomes[5].width == SCENES[1].width and outcomes[0].detections
    # Each outcome carries its call's batch size, an OK one the models that answered: the worker
    # sends them as they come.
    assert {o.batch_images for o in outcomes} == {6}
    assert [bool(o.models) for o in outcomes] == [True, False, False, False, False, True]
    assert outcomes[0].models == pipeline.models


def test_a_chunk_of_only_bad_images_runs_no_model(pipeline: VisionPipeline) -> None:
    outcomes = run(pipeline, [b"not an image"])
    assert [o.code for o in outcomes] == [Code.INVALID_ARGUMENT]


def test_batch_size_above_the_detector_limit_is_refused(model_repo_dir: Path) -> None:
    limit = ModelRepository.load(model_repo_dir).detector.config.max_batch_size
    with pytest.raises(ValueError, match="exceeds the detector's max_batch_size"):
        VisionPipeline.load(model_repo_dir, worker_options(batch_size=limit + 1))
