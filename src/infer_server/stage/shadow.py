"""Shadow runs: a candidate model version runs on images the stable versions answered, and only
the agreement between the two leaves the worker (its results are never returned to anyone).

Used by ``stage.worker`` for chunks routed ``ROUTE_SHADOW``, after the chunk's answer was sent, so
the answered images never wait for the candidate. The front turns the counts into metrics
(``front.metrics``) and the control API's listing.

Agreement, per image: detections are matched greedily, highest IoU first, one to one, at IoU ≥
0.5 whatever their labels (``matched``); a matched pair agrees on its label or not
(``labels_agree``); on each matched pair, every attribute model both sides ran is compared on its
top label (``attributes_compared`` / ``attributes_agree``). Detection agreement is then
``2·labels_agree / (stable + candidate detections)`` (1.0 when both find the same boxes with
the same labels, and when both find nothing).

The budget keeps the answered path fast: a worker runs a sampled shadow chunk only while the time
its shadow runs took stays within ``budget`` (default 0.1) of the time the answered chunks took,
so shadowing can slow the answered path by at most that fraction; a chunk over it is skipped and
counted.
"""

from __future__ import annotations

from collections.abc import Sequence

from infer_server.messages import Agreement, Code, DetectionRecord, ImageOutcome

IOU_MATCH = 0.5


def _iou(a: DetectionRecord, b: DetectionRecord) -> float:
    x1, y1 = max(a.box.x1, b.box.x1), max(a.box.y1, b.box.y1)
    x2, y2 = min(a.box.x2, b.box.x2), min(a.box.y2, b.box.y2)
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    area = (a.box.x2 - a.box.x1) * (a.box.y2 - a.box.y1) + (b.box.x2 - b.box.x1) * (b.box.y2 - b.box.y1)
    return inter / (area - inter) if area - inter > 0 else 0.0


def compare_image(stable: Sequence[DetectionRecord], candidate: Sequence[DetectionRecord]) -> Agreement:
    """How far the candidate's detections of one image agree with the stable ones."""
    found = Agreement(1, len(stable), len(candidate))
    if not stable or not candidate:
        return found
    pairs = [(_iou(s, c), i, j) for i, s in enumerate(stable) for j, c in enumerate(candidate)]
    used_s, used_c = set(), set()
    for iou, i, j in sorted(pairs, key=lambda p: -p[0]):
        if iou < IOU_MATCH:
            break
        if i in used_s or j in used_c:
            continue
        used_s.add(i)
        used_c.add(j)
        found.matched += 1
        found.labels_agree += stable[i].label == candidate[j].label
        theirs = {a.model: a.label for a in candidate[j].attributes}
        for attribute in stable[i].attributes:
            if attribute.model in theirs:
                found.attributes_compared += 1
                found.attributes_agree += attribute.label == theirs[attribute.model]
    return found


def compare(stable: Sequence[ImageOutcome], candidate: Sequence[ImageOutcome]) -> Agreement:
    """Agreement over the images both answered OK (matched by index)."""
    theirs = {o.index: o for o in candidate if o.code == Code.OK}
    total = Agreement()
    for outcome in stable:
        other = theirs.get(outcome.index)
        if outcome.code == Code.OK and other is not None:
            total.add(compare_image(outcome.detections, other.detections))
    return total


class Budget:
    """Shadow runs may take at most ``fraction`` of the answered path's time (see the module)."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.answered_s = 0.0
        self.shadow_s = 0.0

    def answered(self, seconds: float) -> None:
        self.answered_s += seconds

    def allows(self) -> bool:
        return self.shadow_s <= self.fraction * self.answered_s

    def spent(self, seconds: float) -> None:
        self.shadow_s += seconds
