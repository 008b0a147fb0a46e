"""The TensorRT backend on a real GPU: builds from the Q/DQ ONNX, agrees with ONNX Runtime, caches plans.

Skipped unless ``tensorrt`` and ``pycuda`` import and a CUDA GPU is visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

trt = pytest.importorskip("tensorrt")
cuda = pytest.importorskip("pycuda.driver")

from infer_server.stage.backends import create_engine  # noqa: E402
from infer_server.stage.model_repo import ModelRepository  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def gpu() -> None:
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            pytest.skip("no CUDA GPU")
    except cuda.Error as exc:
        pytest.skip(f"CUDA unavailable: {exc}")


def test_detector_agrees_with_onnxruntime_and_plan_is_cached(model_repo_dir: Path, tmp_path: Path) -> None:
    repo = ModelRepository.load(model_repo_dir)
    cfg = repo.detector.config
    x = np.random.default_rng(0).uniform(0, 1, (4, 3, cfg.input.height, cfg.input.width)).astype(np.float32)
    with create_engine(repo.detector.onnx_path, "cpu") as ort_engine:
        expected = ort_engine.infer({cfg.input.name: x})
    with create_engine(repo.detector.onnx_path, "gpu", max_batch_size=8, plan_cache_dir=tmp_path) as engine:
        assert engine.input(cfg.input.name).shape == (-1, 3, cfg.input.height, cfg.input.width)
        got = engine.infer({cfg.input.name: x})
        one = engine.infer({cfg.input.name: x[:1]})
    plans = list(tmp_path.glob("*.plan"))
    assert len(plans) == 1 and trt.__version__ in plans[0].name
    for name, value in expected.items():
        assert got[name].shape == value.shape
        # INT8 kernels differ from ONNX Runtime's by a few quantisation steps.
        np.testing.assert_allclose(got[name], value, atol=0.05)
        np.testing.assert_allclose(one[name][0], got[name][0], atol=1e-3)
    built = plans[0].stat().st_mtime_ns
    with create_engine(repo.detector.onnx_path, "gpu", max_batch_size=8, plan_cache_dir=tmp_path):
        pass
    assert plans[0].stat().st_mtime_ns == built, "the second engine loaded the cached plan"


def test_classifiers_run_on_the_gpu(model_repo_dir: Path, tmp_path: Path) -> None:
    for entry in ModelRepository.load(model_repo_dir).classifiers:
        cfg = entry.config
        with create_engine(entry.onnx_path, "gpu", max_batch_size=16, plan_cache_dir=tmp_path) as engine:
            x = np.zeros((16, 3, cfg.input.height, cfg.input.width), np.float32)
            (logits,) = engine.infer({cfg.input.name: x}).values()
            assert logits.shape == (16, len(cfg.labels))
