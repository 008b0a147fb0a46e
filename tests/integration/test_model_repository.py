"""Every shipped model loads in ONNX Runtime with its config, and is the INT8 form TensorRT accepts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from engines.quantize import nonzero_zero_points
from infer_server.stage.backends import create_engine
from infer_server.stage.model_repo import ModelRepository

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "engines" / "models"


@pytest.fixture(scope="module")
def repo() -> ModelRepository:
    return ModelRepository.load(MODELS)


def test_repository_has_the_default_models_and_routing(repo: ModelRepository) -> None:
    assert repo.detector.config.labels == ["car", "bicycle", "person", "road_sign"]
    assert sorted(c.config.name for c in repo.classifiers) == ["color", "vehicle_type"]
    assert [c.config.name for c in repo.classifiers_for("car")] == ["color", "vehicle_type"]
    assert [c.config.name for c in repo.classifiers_for("person")] == ["color"]


def test_every_model_runs_with_the_shapes_its_config_declares(repo: ModelRepository) -> None:
    for entry in (repo.detector, *repo.classifiers):
        cfg = entry.config
        engine = create_engine(entry.onnx_path, "cpu")
        x = np.random.default_rng(0).random((3, 3, cfg.input.height, cfg.input.width), dtype=np.float32)
        out = engine.infer({cfg.input.name: x})
        if cfg.kind == "detector":
            assert cfg.decode is not None
            grid = (cfg.input.height // cfg.decode.stride, cfg.input.width // cfg.decode.stride)
            cov, bbox = out[cfg.outputs["coverage"]], out[cfg.outputs["bbox"]]
            assert cov.shape == (3, len(cfg.labels), *grid) and bbox.shape == (3, 4 * len(cfg.labels), *grid)
            assert cov.min() >= 0.0 and cov.max() <= 1.0  # sigmoid is part of the model
        else:
            assert out[cfg.outputs["logits"]].shape == (3, len(cfg.labels))
        engine.close()


def test_models_are_symmetric_int8_qdq_within_the_size_budget(repo: ModelRepository) -> None:
    total = 0
    for entry in (repo.detector, *repo.classifiers):
        model = onnx.load(str(entry.onnx_path))
        ops = {n.op_type for n in model.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, entry.config.name
        assert nonzero_zero_points(entry.onnx_path) == [], entry.config.name
        total += sum(f.stat().st_size for f in entry.directory.iterdir())
        assert (entry.directory / "README.md").is_file() and (entry.directory / "metrics.json").is_file()
    assert total <= 40 * 1024 * 1024
