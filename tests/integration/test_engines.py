"""The ONNX Runtime backend on the repository's models: metadata, batch 1 and N, output shapes."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from infer_server.stage.backends import Engine, EngineUnavailable, create_engine
from infer_server.stage.model_repo import ModelRepository


@pytest.fixture(scope="module")
def repo(model_repo_dir: Path) -> ModelRepository:
    return ModelRepository.load(model_repo_dir)


@pytest.fixture(scope="module")
def detector(repo: ModelRepository) -> Iterator[Engine]:
    with create_engine(repo.detector.onnx_path, "cpu") as engine:
        yield engine


def test_detector_metadata_follows_its_config(repo: ModelRepository, detector: Engine) -> None:
    cfg = repo.detector.config
    assert cfg.decode is not None
    grid = (cfg.input.height // cfg.decode.stride, cfg.input.width // cfg.decode.stride)
    n = len(cfg.labels)
    assert [(i.name, i.shape, i.dtype) for i in detector.inputs] == [
        (cfg.input.name, (-1, 3, cfg.input.height, cfg.input.width), np.dtype(np.float32))
    ]
    assert detector.output(cfg.outputs["coverage"]).shape == (-1, n, *grid)
    assert detector.output(cfg.outputs["bbox"]).shape == (-1, 4 * n, *grid)
    with pytest.raises(KeyError, match="no output 'nope'"):
        detector.output("nope")


def test_detector_batch_of_n_equals_n_batches_of_one(repo: ModelRepository, detector: Engine) -> None:
    cfg = repo.detector.config
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (3, 3, cfg.input.height, cfg.input.width)).astype(np.float32)
    batched = detector.infer({cfg.input.name: x})
    assert set(batched) == {o.name for o in detector.outputs}
    cov = batched[cfg.outputs["coverage"]]
    assert cov.shape[0] == 3 and cov.dtype == np.float32
    assert np.all((cov >= 0) & (cov <= 1)), "coverage is a sigmoid output"
    for k in range(3):
        single = detector.infer({cfg.input.name: x[k : k + 1]})
        for name, value in single.items():
            np.testing.assert_allclose(value[0], batched[name][k], rtol=1e-3, atol=1e-4)


def test_classifiers_give_one_score_per_label(repo: ModelRepository) -> None:
    for entry in repo.classifiers:
        cfg = entry.config
        with create_engine(entry.onnx_path, "cpu", intra_op_num_threads=1) as engine:
            assert engine.input(cfg.input.name).shape == (-1, 3, cfg.input.height, cfg.input.width)
            x = np.zeros((5, 3, cfg.input.height, cfg.input.width), np.float32)
            (logits,) = engine.infer({cfg.input.name: x}).values()
            assert logits.shape == (5, len(cfg.labels))


def test_closed_engine_refuses_work(repo: ModelRepository) -> None:
    engine = create_engine(repo.classifiers[0].onnx_path, "cpu")
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.infer({})


def test_unknown_device_is_refused(repo: ModelRepository) -> None:
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        create_engine(repo.detector.onnx_path, "tpu")


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_gpu_without_tensorrt_says_what_is_missing(repo: ModelRepository) -> None:
    with pytest.raises(EngineUnavailable, match="needs the 'tensorrt' and 'pycuda' packages"):
        create_engine(repo.detector.onnx_path, "gpu")
