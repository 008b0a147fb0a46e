"""FP32 ONNX → INT8 ONNX with symmetric Q/DQ, the one artifact both backends run.

ONNX Runtime's ``quantize_static`` in QDQ format, per-channel weights, INT8 activations and
weights, ``ActivationSymmetric``/``WeightSymmetric`` so every zero point is 0: the explicit-
quantization form TensorRT 10/11 builds INT8 engines from (implicit calibration is gone in TRT 11)
and that ONNX Runtime runs on CPU. Weights use 7 bits (``reduce_range``: [-64, 64]) so that no
x86 kernel can saturate its 16-bit pair sums: the same answers on every CPU class
(``engines.int8_agreement``); the recipe refuses a model whose weights exceed that bound.
``quant_pre_process`` first folds BatchNorm into the convs and
infers shapes, so the Q/DQ pairs sit where TensorRT fuses them. Calibration feeds ≥ 256 generated
images through the same resize/normalisation as training.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from engines.int8_agreement import SATURATION_FREE_BOUND, weight_bound


class ArrayReader(CalibrationDataReader):
    """Feeds float32 NCHW batches to the calibrator."""

    def __init__(self, batches: Iterator[np.ndarray], input_name: str = "input") -> None:
        self._batches = batches
        self._name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def to_nchw(images: np.ndarray, batch: int = 8) -> Iterator[np.ndarray]:
    """uint8 NHWC RGB → float32 NCHW × 1/255, in batches (the models' input normalisation)."""
    for i in range(0, len(images), batch):
        yield np.ascontiguousarray(images[i : i + batch].transpose(0, 3, 1, 2), np.float32) / np.float32(255.0)


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Quantize ``fp32_path`` with ``calibration`` (uint8 NHWC images at the model's input size)."""
    if len(calibration) < 256:
        raise ValueError(f"calibration needs at least 256 images, got {len(calibration)}")
    prepped = int8_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    quantize_static(
        str(prepped),
        str(int8_path),
        ArrayReader(to_nchw(calibration)),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        reduce_range=True,  # 7-bit weights: see the module docstring
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    prepped.unlink()
    nonzero = nonzero_zero_points(int8_path)
    if nonzero:
        raise RuntimeError(f"{int8_path}: non-zero zero points in {nonzero[:5]}")
    bound = weight_bound(int8_path)
    if bound > SATURATION_FREE_BOUND:
        raise RuntimeError(f"{int8_path}: INT8 weights reach {bound}, over {SATURATION_FREE_BOUND}: "
                           "its answers would depend on the CPU")


def nonzero_zero_points(path: Path) -> list[str]:
    """Names of Q/DQ nodes whose zero point is not 0 (TensorRT rejects those); [] when symmetric."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
              if n.op_type == "Constant" and n.attribute}
    bad = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            continue  # no zero point input: 0 by definition
        zp = inits.get(node.input[2], consts.get(node.input[2]))
        if zp is None or np.any(zp != 0):
            bad.append(node.name)
    return bad
