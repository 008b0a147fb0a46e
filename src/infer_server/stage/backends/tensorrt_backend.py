"""TensorRT backend: builds an INT8 engine from the Q/DQ ONNX model and runs it on the GPU.

Created by ``infer_server.stage.backends.create_engine`` inside a stage worker process when the server
runs with ``--device gpu``. ``tensorrt`` and ``pycuda`` come with the GPU image (the ``gpu`` extra);
they are imported when an engine is created, so CPU installs never need them and get a clear
``EngineUnavailable`` instead of an ImportError.

Building a plan takes minutes, so plans are cached on disk keyed by GPU name + TensorRT version +
the ONNX file's sha256 (+ the profile's max batch); a file lock makes N workers starting together
build it once. The ONNX carries explicit Q/DQ nodes: TensorRT 10 builds it with the INT8 (+FP16 for
the unquantized rest) flags, TensorRT 11 — which removed the precision flags and implicit
calibration — as a strongly typed network. Inference uses the named-tensor API
(``set_input_shape``/``set_tensor_address``/``execute_async_v3``) on one CUDA stream, with device
buffers sized for the profile's max batch. Inputs that are already CUDA arrays (DALI ``TensorGPU``
from the mixed decoder) are bound in place, so decoded images do not round-trip through the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from infer_server.stage.backends.base import Engine, EngineUnavailable, TensorInfo

log = logging.getLogger(__name__)


def _import_tensorrt() -> tuple[Any, Any]:
    try:
        import pycuda.driver as cuda
        import tensorrt as trt
    except ImportError as exc:
        raise EngineUnavailable(
            f"device 'gpu' needs the 'tensorrt' and 'pycuda' packages ({exc.name} is missing): install "
            "'infer-server[gpu]' or use the GPU Docker image, or run with device 'cpu'"
        ) from None
    return trt, cuda


def default_plan_cache() -> Path:
    """Where plans are cached unless the server's ``plan_cache_dir`` setting says otherwise."""
    return Path.home() / ".cache" / "infer_server" / "plans"


def plan_file_name(onnx_bytes: bytes, gpu_name: str, trt_version: str, max_batch_size: int) -> str:
    """Cache key of a plan: a plan only runs on the GPU model and TensorRT version that built it."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    return f"{gpu}_trt{trt_version}_b{max_batch_size}_{hashlib.sha256(onnx_bytes).hexdigest()}.plan"


def build_plan(
    trt: Any,
    onnx_bytes: bytes,
    *,
    max_batch_size: int,
    opt_batch_size: int,
    workspace_bytes: int,
    logger: Any,
) -> bytes:
    """Serialized engine for ``onnx_bytes`` with one profile: batch 1 … ``max_batch_size``."""
    builder = trt.Builder(logger)
    flags = 0
    weakly_typed = hasattr(trt.BuilderFlag, "INT8")  # TensorRT 10; 11 removed the precision flags
    creation = trt.NetworkDefinitionCreationFlag
    if int(trt.__version__.split(".")[0]) < 10 and hasattr(creation, "EXPLICIT_BATCH"):
        flags |= 1 << int(creation.EXPLICIT_BATCH)  # implicit batch was the default before 10
    if not weakly_typed:
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_bytes):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if weakly_typed:
        config.set_flag(trt.BuilderFlag.INT8)  # the Q/DQ nodes say which layers run in INT8
        config.set_flag(trt.BuilderFlag.FP16)  # the unquantized rest may use FP16 kernels
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape = tuple(tensor.shape)
        if any(d < 0 for d in shape[1:]):
            raise RuntimeError(f"input {tensor.name} has dynamic dimensions besides the batch: {shape}")
        rest = shape[1:]
        profile.set_shape(tensor.name, (1, *rest), (opt_batch_size, *rest), (max_batch_size, *rest))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    return bytes(plan)


def _load_or_build(
    trt: Any,
    runtime: Any,
    onnx_path: Path,
    cache_dir: Path,
    gpu_name: str,
    build_args: dict[str, Any],
    logger: Any,
) -> Any:
    onnx_bytes = onnx_path.read_bytes()
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan_path = cache_dir / plan_file_name(onnx_bytes, gpu_name, trt.__version__, build_args["max_batch_size"])
    with open(plan_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per plan; the others wait, then load it
        if plan_path.is_file():
            engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if engine is not None:
                return engine
            log.warning("cached plan %s does not load; rebuilding", plan_path.name)
        log.info("building TensorRT plan for %s (this takes a while)", onnx_path)
        plan = build_plan(trt, onnx_bytes, logger=logger, **build_args)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(plan)
        os.replace(tmp, plan_path)  # readers see a whole plan or none
    return runtime.deserialize_cuda_engine(plan)


class TensorRTEngine(Engine):
    def __init__(
        self,
        onnx_path: str | Path,
        *,
        max_batch_size: int = 64,
        opt_batch_size: int | None = None,
        plan_cache_dir: str | Path | None = None,
        device_id: int = 0,
        workspace_bytes: int = 1 << 30,
    ):
        trt, cuda = _import_tensorrt()
        self._cuda = cuda
        cuda.init()
        if cuda.Device.count() <= device_id:
            raise EngineUnavailable(f"device 'gpu' needs a CUDA GPU #{device_id}; {cuda.Device.count()} visible")
        device = cuda.Device(device_id)
        # The primary context is the one the CUDA runtime (and so DALI) uses: DALI's device tensors
        # are valid here without a copy.
        self._ctx = device.retain_primary_context()
        self._ctx.push()
        self._closed = False
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        build_args = {
            "max_batch_size": max_batch_size,
            "opt_batch_size": opt_batch_size or max_batch_size,
            "workspace_bytes": workspace_bytes,
        }
        self._engine = _load_or_build(
            trt,
            self._runtime,
            Path(onnx_path),
            Path(plan_cache_dir) if plan_cache_dir else default_plan_cache(),
            device.name(),
            build_args,
            logger,
        )
        if self._engine is None:
            raise RuntimeError("TensorRT could not deserialize the engine it built")
        self._context = self._engine.create_execution_context()
        self._stream = cuda.Stream()
        self.max_batch_size = max_batch_size
        self._bind_tensors(trt, cuda, max_batch_size)

    def _bind_tensors(self, trt: Any, cuda: Any, max_batch_size: int) -> None:
        """Describe the engine's named I/O tensors and allocate host and device buffers for the
        largest batch."""
        inputs: list[TensorInfo] = []
        outputs: list[TensorInfo] = []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            info = TensorInfo(
                name,
                tuple(self._engine.get_tensor_shape(name)),
                np.dtype(trt.nptype(self._engine.get_tensor_dtype(name))),
            )
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs).append(info)
            if is_input:  # max input shapes first, so the context can tell the max output shapes
                self._context.set_input_shape(name, (max_batch_size, *info.shape[1:]))
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self._device: dict[str, Any] = {}
        self._host: dict[str, np.ndarray] = {}
        for info in self.inputs + self.outputs:
            shape = tuple(self._context.get_tensor_shape(info.name))
            self._host[info.name] = cuda.pagelocked_empty(int(np.prod(shape)), info.dtype)
            self._device[info.name] = cuda.mem_alloc(max(1, self._host[info.name].nbytes))

    def infer(self, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if self._closed:
            raise RuntimeError("engine is closed")
        synced = False
        for info in self.inputs:
            value = feeds[info.name]
            cai = getattr(value, "__cuda_array_interface__", None)
            if cai is not None:
                shape, address = tuple(cai["shape"]), int(cai["data"][0])
                dense = np.empty(0, info.dtype).itemsize * np.cumprod((1, *shape[:0:-1]))[::-1]
                strides = cai.get("strides")
                if np.dtype(cai["typestr"]) != info.dtype or (strides is not None and tuple(strides) != tuple(dense)):
                    raise ValueError(f"input {info.name}: need a dense {info.dtype} CUDA array")
                if not synced:  # the producer (DALI) wrote it on its own stream
                    self._cuda.Context.synchronize()
                    synced = True
            else:
                array = np.ascontiguousarray(value, dtype=info.dtype)
                shape = array.shape
                staging = self._host[info.name][: array.size].reshape(shape)
                staging[...] = array
                self._cuda.memcpy_htod_async(self._device[info.name], staging, self._stream)
                address = int(self._device[info.name])
            if not shape or shape[0] > self.max_batch_size:
                raise ValueError(f"input {info.name}: batch of {shape[:1]} exceeds {self.max_batch_size}")
            self._context.set_input_shape(info.name, shape)
            self._context.set_tensor_address(info.name, address)
        views = {}
        for info in self.outputs:
            shape = tuple(self._context.get_tensor_shape(info.name))
            views[info.name] = self._host[info.name][: int(np.prod(shape))].reshape(shape)
            self._context.set_tensor_address(info.name, int(self._device[info.name]))
        if not self._context.execute_async_v3(stream_handle=self._stream.handle):
            raise RuntimeError("TensorRT execution failed")
        for name, view in views.items():
            self._cuda.memcpy_dtoh_async(view, self._device[name], self._stream)
        self._stream.synchronize()
        return {name: view.copy() for name, view in views.items()}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for buffer in self._device.values():
            buffer.free()
        self._device.clear()
        self._context = self._engine = None
        self._ctx.pop()
