"""ONNX Runtime backend: runs the INT8 Q/DQ ONNX models on the CPU (the default device).

Created by ``infer_server.stage.backends.create_engine`` inside a stage worker process. Workers are
processes, one per core, so each session uses one intra-op thread by default and never spins
waiting for work: N workers on N cores then use N threads, not N × cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from infer_server.stage.backends.base import Engine, TensorInfo

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


def _info(arg: Any) -> TensorInfo:
    # Symbolic dimensions ("batch") and unknown ones (None) are both dynamic.
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return TensorInfo(arg.name, shape, np.dtype(_DTYPES.get(arg.type, np.float32)))


class OnnxRuntimeEngine(Engine):
    def __init__(
        self,
        onnx_path: str | Path,
        *,
        intra_op_num_threads: int = 1,
        inter_op_num_threads: int = 1,
        optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_num_threads
        options.inter_op_num_threads = inter_op_num_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = optimization_level
        # Spinning threads burn a core while idle, stealing it from the other workers.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self._session: ort.InferenceSession | None = ort.InferenceSession(
            str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.inputs = tuple(_info(a) for a in self._session.get_inputs())
        self.outputs = tuple(_info(a) for a in self._session.get_outputs())
        self._output_names = [o.name for o in self.outputs]

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError("engine is closed")
        arrays = {i.name: np.ascontiguousarray(feeds[i.name], dtype=i.dtype) for i in self.inputs}
        results = self._session.run(self._output_names, arrays)
        return dict(zip(self._output_names, results, strict=True))

    def close(self) -> None:
        self._session = None
