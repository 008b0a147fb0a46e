"""Detection accuracy against scene ground truth: matching with don't-cares, AP, precision/recall.

Used by the recipe's evaluation (``engines/evaluate.py``) and by the end-to-end accuracy test, so
both judge the server by one rule. KITTI-style don't-care: a ground-truth object under
``DONT_CARE_PX`` on either side at the detector's input scale is neither missed when undetected nor
counted false when detected; a prediction that small is ignored as well.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engines.configs import DETECTOR_INPUT
from engines.data import DONT_CARE_PX


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def dont_care(boxes: np.ndarray, image_w: int, image_h: int) -> np.ndarray:
    """Boxes (original pixels) under DONT_CARE_PX on either side once resized to the detector input."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w = (boxes[:, 2] - boxes[:, 0]) * DETECTOR_INPUT[0] / image_w
    h = (boxes[:, 3] - boxes[:, 1]) * DETECTOR_INPUT[1] / image_h
    return (w < DONT_CARE_PX) | (h < DONT_CARE_PX)


@dataclass
class ImageMatch:
    """Per-prediction verdicts of one image: +1 true positive, 0 false positive, -1 ignored."""

    verdict: np.ndarray
    matched_gt: np.ndarray  # index of the ground truth each prediction matched, -1 if none
    gt_found: np.ndarray  # per ground truth: matched by some prediction
    gt_counted: np.ndarray  # per ground truth: not a don't-care


def match_image(gt_boxes: np.ndarray, gt_classes: np.ndarray, pred_boxes: np.ndarray, pred_scores: np.ndarray,
                pred_classes: np.ndarray, image_w: int, image_h: int, iou: float = 0.5) -> ImageMatch:
    """Greedy matching by descending score within each class (PASCAL VOC), with don't-cares."""
    gt_boxes, pred_boxes = np.asarray(gt_boxes).reshape(-1, 4), np.asarray(pred_boxes).reshape(-1, 4)
    gt_classes, pred_classes = np.asarray(gt_classes), np.asarray(pred_classes)
    gt_dc = dont_care(gt_boxes, image_w, image_h)
    pred_small = dont_care(pred_boxes, image_w, image_h)
    verdict = np.zeros(len(pred_boxes), np.int64)
    matched_gt = np.full(len(pred_boxes), -1, np.int64)
    gt_found = np.zeros(len(gt_boxes), bool)
    ious = iou_matrix(pred_boxes, gt_boxes)
    for p in np.argsort(-np.asarray(pred_scores), kind="stable"):
        same = gt_classes == pred_classes[p]
        cand = np.where(same & ~gt_dc & ~gt_found, ious[p], -1.0)
        g = int(np.argmax(cand)) if len(cand) else -1
        if g >= 0 and cand[g] >= iou:
            verdict[p], matched_gt[p], gt_found[g] = 1, g, True
        elif pred_small[p] or np.any(same & gt_dc & (ious[p] >= iou)):
            verdict[p] = -1
    return ImageMatch(verdict, matched_gt, gt_found, ~gt_dc)


@dataclass
class DetectionTally:
    """Accumulates matches over a data set, per class."""

    num_classes: int
    scores: list[list[float]] = field(default_factory=list)
    hits: list[list[int]] = field(default_factory=list)
    n_gt: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __post_init__(self) -> None:
        self.scores = [[] for _ in range(self.num_classes)]
        self.hits = [[] for _ in range(self.num_classes)]
        self.n_gt = np.zeros(self.num_classes, np.int64)

    def add(self, m: ImageMatch, gt_classes: np.ndarray, pred_scores: np.ndarray, pred_classes: np.ndarray) -> None:
        for c in range(self.num_classes):
            self.n_gt[c] += int(np.sum(m.gt_counted & (np.asarray(gt_classes) == c)))
        for v, s, c in zip(m.verdict, pred_scores, pred_classes, strict=True):
            if v >= 0:
                self.scores[int(c)].append(float(s))
                self.hits[int(c)].append(int(v))

    def average_precision(self) -> np.ndarray:
        """VOC all-point interpolated AP per class."""
        ap = np.zeros(self.num_classes)
        for c in range(self.num_classes):
            if self.n_gt[c] == 0:
                ap[c] = np.nan
                continue
            order = np.argsort(-np.asarray(self.scores[c]), kind="stable")
            tp = np.asarray(self.hits[c], np.float64)[order]
            ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
            recall = ctp / self.n_gt[c]
            precision = ctp / np.maximum(ctp + cfp, 1e-9)
            mrec = np.concatenate([[0.0], recall, [1.0]])
            mpre = np.concatenate([[0.0], precision, [0.0]])
            mpre = np.maximum.accumulate(mpre[::-1])[::-1]
            steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
            ap[c] = float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))
        return ap

    def precision_recall(self, threshold: float) -> tuple[float, float]:
        """Overall precision and recall of predictions scoring ≥ ``threshold``."""
        tp = fp = 0
        for s, h in zip(self.scores, self.hits, strict=True):
            keep = np.asarray(s) >= threshold
            hits = np.asarray(h)[keep]
            tp += int(hits.sum())
            fp += int(len(hits) - hits.sum())
        total = int(self.n_gt.sum())
        return tp / max(1, tp + fp), tp / max(1, total)
