"""ResNet18 networks of the default models (torch, recipe only — never imported by the server).

* ``DetectNetV2`` — ResNet18 backbone with the TAO DetectNet_v2 head: layer4 keeps stride 1 so the
  output stride is 16; a 1×1 conv gives ``output_cov`` [C,H/16,W/16] (sigmoid) and another gives
  ``output_bbox`` [4C,H/16,W/16]. Same tensors, names and meaning as TAO's TrafficCamNet.
* ``Classifier`` — ResNet18 on small crops (64×64) for the attribute models; output ``logits``.

Both are built from a ``Widths`` record instead of fixed channel counts, so that structured pruning
can rebuild a genuinely smaller network (``engines/prune.py``) with the surviving channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

STAGES = 4
BLOCKS = 2  # ResNet18: two BasicBlocks per stage


def _full_stream() -> list[int]:
    return [64, 128, 256, 512]


def _full_mid() -> list[list[int]]:
    return [[64, 64], [128, 128], [256, 256], [512, 512]]


@dataclass
class Widths:
    """Channel counts: ``stream[s]`` is the residual stream of stage s (stage 0 shares it with the
    stem), ``mid[s][b]`` the inner width of block b of stage s."""

    stream: list[int] = field(default_factory=_full_stream)
    mid: list[list[int]] = field(default_factory=_full_mid)

    def as_dict(self) -> dict:
        return {"stream": self.stream, "mid": self.mid}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Backbone(nn.Module):
    def __init__(self, widths: Widths, strides: tuple[int, ...], stem_pool: bool = True) -> None:
        super().__init__()
        self.widths = widths
        w0 = widths.stream[0]
        self.conv1 = nn.Conv2d(3, w0, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if stem_pool else nn.Identity()
        layers = []
        cin = w0
        for s in range(STAGES):
            blocks = []
            for b in range(BLOCKS):
                blocks.append(BasicBlock(cin, widths.mid[s][b], widths.stream[s], strides[s] if b == 0 else 1))
                cin = widths.stream[s]
            layers.append(nn.Sequential(*blocks))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for layer in self.layers:
            x = layer(x)
        return x


class DetectNetV2(nn.Module):
    """Inputs ``input`` [N,3,H,W] RGB in [0,1]; outputs ``output_cov`` (sigmoid) and ``output_bbox``."""

    def __init__(self, num_classes: int = 4, widths: Widths | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = ResNet18Backbone(widths or Widths(), strides=(1, 2, 2, 1))
        feat = self.backbone.widths.stream[-1]
        self.cov = nn.Conv2d(feat, num_classes, 1)
        self.bbox = nn.Conv2d(feat, 4 * num_classes, 1)
        nn.init.constant_(self.cov.bias, -4.0)  # start with "nothing here": positives are rare
        nn.init.normal_(self.bbox.weight, std=0.01)

    def forward_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)
        return self.cov(f), self.bbox(f)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cov, bbox = self.forward_logits(x)
        return torch.sigmoid(cov), bbox


class Classifier(nn.Module):
    """ResNet18 classifier on crops; output ``logits`` [N, num_classes]."""

    def __init__(self, num_classes: int, widths: Widths | None = None) -> None:
        super().__init__()
        self.backbone = ResNet18Backbone(widths or Widths(), strides=(1, 2, 2, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.backbone.widths.stream[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.backbone(x)), 1))


def export_onnx(model: nn.Module, path: str, input_hw: tuple[int, int], output_names: list[str]) -> None:
    """FP32 ONNX with a dynamic batch axis (opset 17), the input of ``quantize.py``."""
    model.eval()
    dummy = torch.zeros(1, 3, *input_hw)
    torch.onnx.export(
        model, (dummy,), path, input_names=["input"], output_names=output_names, opset_version=17,
        dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in output_names}}, dynamo=False,
    )
