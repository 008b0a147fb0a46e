"""ResNet18/34 classifiers as ONNX graphs with random weights, built with ``onnx.helper`` and NumPy.

Used by ``benchmarks.repos`` for the ``seed4`` configuration only (never by ``src/`` or the tests):
speed is all that is measured there, so untrained weights do — the benchmark's output says so.
No torch: the graph is the eval-mode network with BatchNorm already folded into the convolutions
(conv + bias → ReLU, basic residual blocks, a 1×1 stride-2 projection where the shape changes),
then global average pooling, flatten and one Gemm — the graph an exported, BN-folded torchvision
ResNet has. Weights are He-initialised; the second convolution of each block is scaled down
(like zero-γ residual init) so the random network's activations stay in a sane range through 8–16
residual additions, which matters for INT8 calibration, not for speed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
WIDTHS = (64, 128, 256, 512)
OPSET = 17
RESIDUAL_SCALE = 0.2


class _Graph:
    """Collects nodes and initializers while the network is laid out."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def name(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self._n}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int, relu: bool, scale: float = 1.0) -> str:
        std = np.sqrt(2.0 / (cin * k * k)) * scale  # He init for ReLU
        w, b = self.name("w"), self.name("b")
        self.inits += [
            numpy_helper.from_array(self.rng.normal(0, std, (cout, cin, k, k)).astype(np.float32), w),
            numpy_helper.from_array(np.zeros(cout, np.float32), b),
        ]
        y = self.name("conv")
        pad = k // 2
        self.nodes.append(
            helper.make_node("Conv", [x, w, b], [y], kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
        )
        return self.relu(y) if relu else y

    def relu(self, x: str) -> str:
        y = self.name("relu")
        self.nodes.append(helper.make_node("Relu", [x], [y]))
        return y

    def block(self, x: str, cin: int, cout: int, stride: int) -> str:
        """Basic residual block: conv3×3 → ReLU → conv3×3, plus the (projected) input, → ReLU."""
        y = self.conv(x, cin, cout, 3, stride, relu=True)
        y = self.conv(y, cout, cout, 3, 1, relu=False, scale=RESIDUAL_SCALE)
        shortcut = x if stride == 1 and cin == cout else self.conv(x, cin, cout, 1, stride, relu=False)
        s = self.name("add")
        self.nodes.append(helper.make_node("Add", [y, shortcut], [s]))
        return self.relu(s)


def build_resnet(depth: int, num_classes: int, size: int, seed: int) -> onnx.ModelProto:
    """ResNet-``depth`` on ``[batch, 3, size, size]`` float32 → ``logits`` ``[batch, num_classes]``."""
    g = _Graph(np.random.default_rng(seed))
    x = g.conv("input", 3, 64, 7, 2, relu=True)
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("MaxPool", [x], [pooled], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = pooled, 64
    for stage, (n, width) in enumerate(zip(BLOCKS[depth], WIDTHS, strict=True)):
        for i in range(n):
            x = g.block(x, cin, width, 2 if i == 0 and stage > 0 else 1)
            cin = width
    gap, flat = g.name("gap"), g.name("flat")
    g.nodes += [helper.make_node("GlobalAveragePool", [x], [gap]), helper.make_node("Flatten", [gap], [flat])]
    std = np.sqrt(1.0 / cin)
    g.inits += [
        numpy_helper.from_array(g.rng.normal(0, std, (num_classes, cin)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(num_classes, np.float32), "fc_b"),
    ]
    g.nodes.append(helper.make_node("Gemm", [flat, "fc_w", "fc_b"], ["logits"], transB=1))
    graph = helper.make_graph(
        g.nodes,
        f"resnet{depth}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def write_resnet(path: Path, depth: int, num_classes: int, size: int = 224, seed: int = 0) -> Path:
    onnx.save(build_resnet(depth, num_classes, size, seed), str(path))
    return path
