"""The ``config.yaml`` of each default model, written by the recipe next to its ``model.onnx``.

One place for the numbers the server reads (input size, normalisation, labels, DetectNet_v2 decode
parameters, thresholds, routing); ``infer_server.stage.model_repo`` validates them on load.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from engines.scenes import CLASSES, COLORS, VEHICLE_TYPES

DETECTOR_INPUT = (416, 416)  # width, height
CROP_INPUT = (64, 64)
STRIDE = 16
BBOX_NORM = 35.0
OFFSET = 0.5
CROP_PADDING = 0.05


def detector_config(confidence_threshold: float = 0.5, version: str = "1") -> dict:
    return {
        "name": "detector",
        "kind": "detector",
        "version": version,
        "input": {"name": "input", "width": DETECTOR_INPUT[0], "height": DETECTOR_INPUT[1], "color": "rgb",
                  "scale": 1.0 / 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "outputs": {"coverage": "output_cov", "bbox": "output_bbox"},
        "labels": list(CLASSES),
        "decode": {"stride": STRIDE, "bbox_norm": BBOX_NORM, "offset": OFFSET,
                   "confidence_threshold": round(confidence_threshold, 3), "nms_iou_threshold": 0.5,
                   "min_box_size": 4.0, "max_detections": 100},
        "max_batch_size": 64,
    }


def classifier_config(name: str, version: str = "1") -> dict:
    labels, applies_to = {"color": (COLORS, list(CLASSES)), "vehicle_type": (VEHICLE_TYPES, ["car"])}[name]
    return {
        "name": name,
        "kind": "classifier",
        "version": version,
        "input": {"name": "input", "width": CROP_INPUT[0], "height": CROP_INPUT[1], "color": "rgb",
                  "scale": 1.0 / 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]},
        "outputs": {"logits": "logits"},
        "labels": list(labels),
        "applies_to": applies_to,
        "crop_padding": CROP_PADDING,
        "max_batch_size": 256,
    }


def write_config(directory: Path, config: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
