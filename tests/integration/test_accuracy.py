"""End-to-end accuracy on unseen generated scenes with exact ground truth, through the real server.

Recall and precision at IoU 0.5 (same class) must both reach 0.9; attributes (colour for every
class, vehicle type for cars) must be right on at least 90% of the matched objects. Matching and
the don't-care rule (objects under 12 px on a side at the 416×416 input are neither missed nor
false) are ``engines.metrics``, the same code the recipe's evaluation uses.
"""

from __future__ import annotations

import numpy as np

from engines.metrics import match_image
from engines.scenes import generate_scene
from infer_client import ImageResult
from tests.integration.conftest import RunningServer

SEEDS = range(7_000_000, 7_000_040)  # disjoint from every seed range the recipe uses


def test_detections_and_attributes_match_ground_truth(server: RunningServer) -> None:
    scenes = [generate_scene(seed) for seed in SEEDS]
    with server.client() as client:
        results: list[ImageResult] = client.detect([s.jpeg for s in scenes])
    tp = fp = counted = attrs_right = 0
    for result, scene in zip(results, scenes, strict=True):
        assert result.ok, result.message
        gt_boxes = np.array([o.box for o in scene.objects]).reshape(-1, 4)
        gt_classes = np.array([o.class_id for o in scene.objects])
        dets = result.detections
        m = match_image(
            gt_boxes,
            gt_classes,
            np.array([d.box.as_tuple() for d in dets]).reshape(-1, 4),
            np.array([d.score for d in dets]),
            np.array([d.class_id for d in dets]),
            scene.width,
            scene.height,
        )
        tp += int(np.sum(m.verdict == 1))
        fp += int(np.sum(m.verdict == 0))
        counted += int(m.gt_counted.sum())
        for det, g in zip(dets, m.matched_gt, strict=True):
            if g < 0:
                continue
            obj = scene.objects[g]
            color = det.attributes.get("color")
            vtype = det.attributes.get("vehicle_type")
            attrs_right += bool(color and color.label == obj.color) and (
                obj.vehicle_type is None or bool(vtype and vtype.label == obj.vehicle_type)
            )
    recall, precision = tp / max(1, counted), tp / max(1, tp + fp)
    attr_accuracy = attrs_right / max(1, tp)
    summary = f"recall {recall:.3f} precision {precision:.3f} attributes {attr_accuracy:.3f} ({tp=} {fp=} {counted=})"
    print(summary)  # shown with -s / -rP: the numbers behind the verdict
    assert counted >= 150, summary  # enough objects for the ratios to mean something
    assert recall >= 0.9 and precision >= 0.9, summary
    assert attr_accuracy >= 0.9, summary
