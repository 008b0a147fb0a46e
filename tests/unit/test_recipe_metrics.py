"""The recipe's training targets, its evaluation rule, and the server's decode agree.

Training targets are built by ``engines.data.detectnet_targets``; the server (and the evaluation)
decode with ``infer_server.stage.postprocess``. Feeding perfect targets to the server's decode must give
back the ground-truth boxes — otherwise the model would learn one convention and be read in another.
"""

from __future__ import annotations

import numpy as np

from engines.configs import DETECTOR_INPUT, detector_config
from engines.data import detectnet_targets
from engines.metrics import DetectionTally, match_image
from infer_server.stage.model_repo import ModelConfig
from infer_server.stage.postprocess import postprocess_detector


def test_targets_decoded_by_the_server_give_back_the_boxes() -> None:
    cfg = ModelConfig.model_validate(detector_config(0.5))
    boxes = np.array([[40.3, 50.2, 140.9, 110.4], [200.0, 180.0, 230.5, 300.0], [300.0, 20.0, 390.0, 60.0]])
    classes = np.array([0, 2, 3])
    cov, bbox, mask = detectnet_targets(boxes, classes, 4)
    assert mask.min() == 1.0  # no don't-care objects here
    image_w, image_h = 1248, 832  # 3x and 2x the input: decode must scale back
    d = postprocess_detector(
        cov,
        bbox,
        cfg.decode,
        input_width=DETECTOR_INPUT[0],
        input_height=DETECTOR_INPUT[1],
        image_width=image_w,
        image_height=image_h,
    )
    order = np.argsort(d.class_ids)
    np.testing.assert_array_equal(d.class_ids[order], classes)
    np.testing.assert_allclose(d.boxes[order], boxes * [3, 2, 3, 2], atol=1e-3)


def test_tiny_objects_are_masked_out_of_the_loss_not_negatives() -> None:
    cov, _, mask = detectnet_targets(np.array([[100.0, 100.0, 108.0, 130.0]]), np.array([1]), 4)
    assert cov.sum() == 0 and mask[1].min() == 0.0 and mask[0].min() == 1.0


def test_matching_counts_hits_misses_duplicates_and_dont_cares() -> None:
    gt = np.array([[0, 0, 100, 100], [200, 200, 300, 300], [500, 500, 505, 530]], float)  # last: don't-care
    gt_cls = np.array([0, 1, 0])
    pred = np.array([[2, 2, 100, 100], [0, 0, 98, 99], [200, 200, 300, 300], [500, 500, 505, 529], [600, 0, 700, 80]])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    pred_cls = np.array([0, 0, 2, 0, 0])  # third has the wrong class
    m = match_image(gt, gt_cls, pred, scores, pred_cls, image_w=416, image_h=416)
    # hit, duplicate (false), wrong class (false), don't-care (ignored), nothing there (false)
    assert m.verdict.tolist() == [1, 0, 0, -1, 0]
    assert m.gt_found.tolist() == [True, False, False] and m.gt_counted.tolist() == [True, True, False]
    tally = DetectionTally(4)
    tally.add(m, gt_cls, scores, pred_cls)
    ap = tally.average_precision()
    assert ap[0] == 1.0  # the only counted car was found first
    assert ap[1] == 0.0  # the bicycle was missed
    assert np.isnan(ap[2]) and np.isnan(ap[3])  # no ground truth of those classes
    precision, recall = tally.precision_recall(0.0)
    assert (precision, recall) == (1 / 4, 1 / 2)
