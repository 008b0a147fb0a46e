"""Inference engines: one interface (``Engine``), a backend per device.

``create_engine`` is called by the stage worker (``infer_server.stage.pipeline``) for the detector and
every attribute model: device ``cpu`` → ONNX Runtime, ``gpu`` → TensorRT (built from the same
Q/DQ INT8 ONNX). Backends are imported on demand, so a CPU install never imports TensorRT.
"""

from __future__ import annotations

from pathlib import Path

from infer_server.stage.backends.base import Engine, EngineUnavailable, TensorInfo

__all__ = ["Engine", "EngineUnavailable", "TensorInfo", "create_engine"]


def create_engine(
    onnx_path: str | Path,
    device: str,
    *,
    max_batch_size: int = 64,
    intra_op_num_threads: int = 1,
    plan_cache_dir: str | Path | None = None,
) -> Engine:
    """Load ``onnx_path`` for ``device``.

    ``max_batch_size`` sizes the TensorRT profile and buffers (ONNX Runtime needs no bound);
    ``intra_op_num_threads`` is ONNX Runtime's thread count (one per worker process by default);
    ``plan_cache_dir`` is where TensorRT plans are cached (default ``~/.cache/infer_server/plans``).
    """
    if device == "cpu":
        from infer_server.stage.backends.onnxruntime_backend import OnnxRuntimeEngine

        return OnnxRuntimeEngine(onnx_path, intra_op_num_threads=intra_op_num_threads)
    if device == "gpu":
        from infer_server.stage.backends.tensorrt_backend import TensorRTEngine

        return TensorRTEngine(onnx_path, max_batch_size=max_batch_size, plan_cache_dir=plan_cache_dir)
    raise ValueError(f"unknown device {device!r} (expected 'cpu' or 'gpu')")
