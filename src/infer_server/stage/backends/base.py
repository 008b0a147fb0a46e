"""The inference-engine interface every backend implements (ONNX Runtime on CPU, TensorRT on GPU).

Used by the stage worker (``infer_server.stage.pipeline``, inside a worker process) to run the detector
and the attribute classifiers without knowing which backend is underneath; ``create_engine`` in
``infer_server.stage.backends`` picks the backend from the device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np


class EngineUnavailable(RuntimeError):
    """A backend cannot run here (missing package or device); the message says what is missing."""


@dataclass(frozen=True)
class TensorInfo:
    """One named input or output; ``-1`` marks a dynamic dimension (the batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


class Engine(ABC):
    """A loaded model: named arrays in, named arrays out.

    ``infer`` takes NumPy arrays; backends on a GPU also take CUDA arrays (objects with
    ``__cuda_array_interface__``, e.g. DALI's ``TensorGPU``) so decoded images need not return to
    the host. Outputs are always host NumPy arrays owned by the caller.
    """

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]

    @abstractmethod
    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Run one batch; ``feeds`` names every input, the result every output."""

    @abstractmethod
    def close(self) -> None:
        """Release the model and its buffers; the engine is unusable afterwards."""

    def input(self, name: str) -> TensorInfo:
        for info in self.inputs:
            if info.name == name:
                return info
        raise KeyError(f"model has no input {name!r} (inputs: {[i.name for i in self.inputs]})")

    def output(self, name: str) -> TensorInfo:
        for info in self.outputs:
            if info.name == name:
                return info
        raise KeyError(f"model has no output {name!r} (outputs: {[o.name for o in self.outputs]})")

    def __enter__(self) -> Engine:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
