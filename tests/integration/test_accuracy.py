"""End-to-end accuracy on unseen generated scenes with exact ground truth, through the real server.

Recall and precision at IoU 0.5 (same class) and attribute accuracy (colour for every class, vehicle
type for cars, on the matched objects) must reach the bars below. Matching and the don't-care rule
(objects under 12 px on a side at the 416×416 input are neither missed nor false) are
``engines.metrics``, the same code the recipe's evaluation uses.

How the bars were set: each is the value this test measured with the shipped models, minus three
standard deviations of that value under resampling of the 40 scenes (bootstrap; the test prints
both: ``pytest -s tests/integration/test_accuracy.py``), rounded down to 0.01. The answers themselves
do not depend on the CPU (``tests/models/test_int8_agreement.py``), so that margin is what a rebuilt
model of the same quality may lose on these particular scenes, not room for one CPU class's rounding.
The first demo models, whose answers did depend on the CPU, measured 0.919 here and 0.893 on an
AVX2-only CPU against a fixed bar of 0.9. Rebuild the models → re-measure and reset the bars.
"""

from __future__ import annotations

import numpy as np

from engines.metrics import match_image
from engines.scenes import generate_scene
from infer_client import ImageResult
from tests.integration.conftest import RunningServer

SEEDS = range(7_000_000, 7_000_040)  # disjoint from every seed range the recipe uses
# Measured 2026-12-02 (models of that day's recipe run, trained on both drawing styles): recall
# 0.906 (sd 0.020), precision 0.951 (sd 0.016), attributes 0.981 (sd 0.011); 212 of 234 objects
# found, 11 false detections.
BARS = {"recall": 0.84, "precision": 0.90, "attributes": 0.94}


def _ratios(rows: np.ndarray) -> dict[str, float]:
    """rows: per scene [true positives, false positives, objects counted, attributes right]."""
    tp, fp, counted, right = rows.sum(0)
    return {"recall": tp / max(1, counted), "precision": tp / max(1, tp + fp), "attributes": right / max(1, tp)}


def _bootstrap_sd(rows: np.ndarray, resamples: int = 2000) -> dict[str, float]:
    rng = np.random.default_rng(0)
    draws = [_ratios(rows[rng.integers(0, len(rows), len(rows))]) for _ in range(resamples)]
    return {k: float(np.std([d[k] for d in draws])) for k in draws[0]}


def test_detections_and_attributes_match_ground_truth(server: RunningServer) -> None:
    scenes = [generate_scene(seed) for seed in SEEDS]
    with server.client() as client:
        results: list[ImageResult] = client.detect([s.jpeg for s in scenes])
    rows = []
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
        right = 0
        for det, g in zip(dets, m.matched_gt, strict=True):
            if g < 0:
                continue
            obj = scene.objects[g]
            color = det.attributes.get("color")
            vtype = det.attributes.get("vehicle_type")
            right += bool(color and color.label == obj.color) and (
                obj.vehicle_type is None or bool(vtype and vtype.label == obj.vehicle_type)
            )
        rows.append((int(np.sum(m.verdict == 1)), int(np.sum(m.verdict == 0)), int(m.gt_counted.sum()), right))
    table = np.array(rows, np.int64)
    value, sd = _ratios(table), _bootstrap_sd(table)
    tp, fp, counted, _ = (int(v) for v in table.sum(0))
    summary = ", ".join(f"{k} {value[k]:.3f} (sd {sd[k]:.3f}, bar {BARS[k]})" for k in BARS)
    summary += f" ({tp=} {fp=} {counted=})"
    print(summary)  # shown with -s / -rP: the numbers behind the verdict and behind the bars
    assert counted >= 150, summary  # enough objects for the ratios to mean something
    for k, bar in BARS.items():
        assert value[k] >= bar, summary


def test_a_blank_frame_has_nothing_in_it(server: RunningServer) -> None:
    """An all-black (or all-white, or grey) camera frame: no detections. The first demo models,
    trained on one drawing style only, found 13 cars at 0.99 in a black frame."""
    import cv2

    frames = [np.full((720, 1280, 3), level, np.uint8) for level in (0, 128, 255)]
    with server.client() as client:
        results = client.detect([cv2.imencode(".jpg", f)[1].tobytes() for f in frames])
    assert [(r.ok, len(r.detections)) for r in results] == [(True, 0)] * 3
