"""End-to-end accuracy on held-out generated scenes with exact ground truth (needs the trained models).

Recall and precision at IoU 0.5 (same class) must both reach 0.9. Objects smaller than 12 px on
either side at the detector's 416x416 input scale are don't-care: missing one is no miss, and a
detection matching one is no false positive. Attributes (colour for every class, vehicle type for
cars) must all be right on at least 90% of the matched objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.scenes import Scene, SceneObject, generate_scene
from infer_client import Detection, ImageResult
from tests.integration.conftest import RunningServer

SEEDS = range(7_000_000, 7_000_040)  # far from the training seeds
INPUT_SIZE = 416
DONT_CARE_PX = 12.0


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    attrs_right: int = 0


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def dont_care(obj: SceneObject, scene: Scene) -> bool:
    x1, y1, x2, y2 = obj.box
    return (x2 - x1) * INPUT_SIZE / scene.width < DONT_CARE_PX or (y2 - y1) * INPUT_SIZE / scene.height < DONT_CARE_PX


def attributes_right(det: Detection, obj: SceneObject) -> bool:
    color = det.attributes.get("color")
    if color is None or color.label != obj.color:
        return False
    if obj.vehicle_type is not None:
        vtype = det.attributes.get("vehicle_type")
        return vtype is not None and vtype.label == obj.vehicle_type
    return True


def score_scene(result: ImageResult, scene: Scene, tally: Tally) -> None:
    """Greedy matching, most confident detection first, each ground-truth object used once."""
    unmatched = list(scene.objects)
    for det in sorted(result.detections, key=lambda d: d.score, reverse=True):
        box = det.box.as_tuple()
        candidates = [(iou(box, o.box), i) for i, o in enumerate(unmatched) if o.class_id == det.class_id]
        best, i = max(candidates, default=(0.0, -1))
        if best < 0.5:
            tally.fp += 1
            continue
        obj = unmatched.pop(i)
        if not dont_care(obj, scene):
            tally.tp += 1
            tally.attrs_right += attributes_right(det, obj)
    tally.fn += sum(not dont_care(o, scene) for o in unmatched)


def test_detections_and_attributes_match_ground_truth(server: RunningServer, trained_models: Path) -> None:
    scenes = [generate_scene(seed) for seed in SEEDS]
    with server.client() as client:
        results = client.detect([s.jpeg for s in scenes])
    tally = Tally()
    for result, scene in zip(results, scenes, strict=True):
        assert result.ok, result.message
        score_scene(result, scene, tally)
    recall = tally.tp / max(1, tally.tp + tally.fn)
    precision = tally.tp / max(1, tally.tp + tally.fp)
    attr_accuracy = tally.attrs_right / max(1, tally.tp)
    summary = f"recall {recall:.3f} precision {precision:.3f} attributes {attr_accuracy:.3f} ({tally})"
    assert recall >= 0.9 and precision >= 0.9, summary
    assert attr_accuracy >= 0.9, summary
