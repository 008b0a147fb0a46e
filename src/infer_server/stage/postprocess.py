"""DetectNet_v2 post-processing on the CPU: grid decode, confidence filter, per-class NMS, scaling.

Called by the stage worker (``infer_server.stage.pipeline``, in a worker process) for every image the
detector ran on, and by the model evaluation in ``engines/`` so that accuracy is measured on exactly
what the server returns. Pure NumPy, no state.

The decode is the one of TAO / DeepStream's DetectNet_v2 parser: the detector predicts, per class
``c`` and grid cell (row ``i``, column ``j``), a coverage (already sigmoid-ed) and four distances
from the cell centre ``(j * stride + offset, i * stride + offset)`` to the box sides, divided by
``bbox_norm``::

    x1 = cx - bbox[4c + 0] * bbox_norm      x2 = cx + bbox[4c + 2] * bbox_norm
    y1 = cy - bbox[4c + 1] * bbox_norm      y2 = cy + bbox[4c + 3] * bbox_norm

DeepStream writes the same as ``x1 = (b0 - gc_x) * -norm`` with ``gc_x = (j * stride + offset) / norm``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from infer_server.stage.model_repo import DecodeSpec


@dataclass(frozen=True)
class Detections:
    """Detections of one image, in ORIGINAL image pixels, sorted by descending score after NMS."""

    boxes: np.ndarray  # float32 [N, 4] x1, y1, x2, y2
    scores: np.ndarray  # float32 [N]
    class_ids: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.scores)

    def take(self, index: np.ndarray) -> Detections:
        return Detections(self.boxes[index], self.scores[index], self.class_ids[index])

    @staticmethod
    def empty() -> Detections:
        return Detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


def decode_detectnet_v2(
    coverage: np.ndarray,
    bbox: np.ndarray,
    spec: DecodeSpec,
    *,
    input_width: int,
    input_height: int,
    image_width: int,
    image_height: int,
) -> Detections:
    """Candidate boxes of one image: cells over their class threshold, clipped, big enough, scaled.

    ``coverage`` is ``[C, H/stride, W/stride]``, ``bbox`` ``[4C, H/stride, W/stride]``. Boxes are
    clipped to the input and dropped when smaller than ``spec.min_box_size`` input pixels on either
    side, then scaled to ``image_width`` × ``image_height``. No NMS: see ``postprocess_detector``.
    """
    num_classes, grid_h, grid_w = coverage.shape
    if bbox.shape != (4 * num_classes, grid_h, grid_w):
        raise ValueError(f"bbox shape {bbox.shape} does not match coverage shape {coverage.shape}")
    thresholds = np.asarray(spec.thresholds(num_classes), np.float32).reshape(-1, 1, 1)
    cls, row, col = np.nonzero(coverage >= thresholds)
    if cls.size == 0:
        return Detections.empty()
    scores = coverage[cls, row, col].astype(np.float32)
    # [C, 4, gh, gw] → the four distances of every kept cell, [N, 4].
    dist = bbox.reshape(num_classes, 4, grid_h, grid_w)[cls, :, row, col].astype(np.float32) * spec.bbox_norm
    cx = col.astype(np.float32) * spec.stride + spec.offset
    cy = row.astype(np.float32) * spec.stride + spec.offset
    boxes = np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], axis=1)
    np.clip(boxes[:, 0::2], 0.0, float(input_width), out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, float(input_height), out=boxes[:, 1::2])
    big = ((boxes[:, 2] - boxes[:, 0]) >= spec.min_box_size) & ((boxes[:, 3] - boxes[:, 1]) >= spec.min_box_size)
    # IoU is invariant under per-axis scaling, so scaling before NMS changes nothing but the units.
    scale = np.array([image_width / input_width, image_height / input_height] * 2, np.float32)
    return Detections((boxes[big] * scale).astype(np.float32), scores[big], cls[big].astype(np.int64))


def nms_per_class(d: Detections, iou_threshold: float, max_detections: int) -> Detections:
    """Greedy NMS within each class; at most ``max_detections`` boxes, by descending score.

    Boxes of different classes are shifted apart by a per-class offset so one vectorised pass does
    every class (the torchvision ``batched_nms`` trick); each iteration keeps the best remaining box
    and drops, in one array operation, all remaining boxes overlapping it above ``iou_threshold``.
    """
    if len(d) == 0 or max_detections <= 0:
        return Detections.empty()
    order = np.argsort(-d.scores, kind="stable")
    boxes = d.boxes[order].astype(np.float64)
    shift = (boxes.max() + 1.0) * d.class_ids[order].astype(np.float64)
    boxes = boxes + shift[:, None]
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 0) * np.maximum(boxes[:, 3] - boxes[:, 1], 0)
    remaining = np.arange(len(order))
    keep: list[int] = []
    while remaining.size and len(keep) < max_detections:
        best, rest = remaining[0], remaining[1:]
        keep.append(int(best))
        w = np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0])
        h = np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1])
        inter = np.maximum(w, 0) * np.maximum(h, 0)
        union = area[best] + area[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        remaining = rest[iou <= iou_threshold]
    return d.take(order[np.asarray(keep, np.int64)])


def postprocess_detector(
    coverage: np.ndarray,
    bbox: np.ndarray,
    spec: DecodeSpec,
    *,
    input_width: int,
    input_height: int,
    image_width: int,
    image_height: int,
) -> Detections:
    """What the server returns for one image: decode + threshold + min size + per-class NMS."""
    candidates = decode_detectnet_v2(
        coverage,
        bbox,
        spec,
        input_width=input_width,
        input_height=input_height,
        image_width=image_width,
        image_height=image_height,
    )
    return nms_per_class(candidates, spec.nms_iou_threshold, spec.max_detections)
