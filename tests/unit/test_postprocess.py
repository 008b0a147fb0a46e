"""DetectNet_v2 decode and NMS against boxes computed by hand from hand-built grids."""

from __future__ import annotations

import numpy as np
import pytest

from infer_server.stage.model_repo import DecodeSpec
from infer_server.stage.postprocess import Detections, decode_detectnet_v2, nms_per_class, postprocess_detector

# A 80x64 input at stride 16 is a 4 (rows) x 5 (columns) grid.
INPUT_W, INPUT_H, GRID_H, GRID_W = 80, 64, 4, 5
SPEC = DecodeSpec(stride=16, bbox_norm=35.0, offset=0.5, confidence_threshold=0.4, nms_iou_threshold=0.5,
                  min_box_size=4.0, max_detections=100)  # fmt: skip


def grid(num_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    return (np.zeros((num_classes, GRID_H, GRID_W), np.float32),
            np.zeros((4 * num_classes, GRID_H, GRID_W), np.float32))  # fmt: skip


def put(cov: np.ndarray, bbox: np.ndarray, c: int, row: int, col: int, score: float,
        dist: tuple[float, float, float, float]) -> None:  # fmt: skip
    """A prediction of class ``c`` in one cell; ``dist`` are the model's (normalised) distances."""
    cov[c, row, col] = score
    bbox[4 * c : 4 * c + 4, row, col] = dist


def decode(
    cov: np.ndarray, bbox: np.ndarray, spec: DecodeSpec = SPEC, image: tuple[int, int] = (INPUT_W, INPUT_H)
) -> Detections:
    return decode_detectnet_v2(cov, bbox, spec, input_width=INPUT_W, input_height=INPUT_H,
                               image_width=image[0], image_height=image[1])  # fmt: skip


def test_one_cell_decodes_to_the_hand_computed_box() -> None:
    cov, bbox = grid()
    put(cov, bbox, 0, row=1, col=2, score=0.9, dist=(0.5, 0.2, 0.4, 0.6))
    d = decode(cov, bbox)
    # centre = (2*16 + 0.5, 1*16 + 0.5) = (32.5, 16.5); distances x 35 = (17.5, 7, 14, 21)
    np.testing.assert_allclose(d.boxes, [[15.0, 9.5, 46.5, 37.5]], atol=1e-4)
    np.testing.assert_allclose(d.scores, [0.9])
    assert d.class_ids.tolist() == [0]
    assert d.boxes.dtype == np.float32 and d.scores.dtype == np.float32 and d.class_ids.dtype == np.int64


def test_boxes_are_scaled_per_axis_to_the_original_image() -> None:
    cov, bbox = grid()
    put(cov, bbox, 1, row=1, col=2, score=0.9, dist=(0.5, 0.2, 0.4, 0.6))
    d = decode(cov, bbox, image=(160, 32))  # x2, y0.5
    np.testing.assert_allclose(d.boxes, [[30.0, 4.75, 93.0, 18.75]], atol=1e-4)
    assert d.class_ids.tolist() == [1]


def test_matches_deepstream_formula_on_a_random_grid() -> None:
    rng = np.random.default_rng(1)
    cov = rng.uniform(0, 1, (3, GRID_H, GRID_W)).astype(np.float32)
    bbox = rng.uniform(0, 1, (12, GRID_H, GRID_W)).astype(np.float32)
    spec = SPEC.model_copy(update={"min_box_size": 0.0, "confidence_threshold": 0.0})
    d = decode(cov, bbox, spec)
    assert len(d) == 3 * GRID_H * GRID_W
    norm = spec.bbox_norm
    cells = [(c, row, col) for c in range(3) for row in range(GRID_H) for col in range(GRID_W)]
    for box, (c, row, col) in zip(d.boxes, cells, strict=True):  # np.nonzero order: class, row, column
        gx, gy = (col * spec.stride + spec.offset) / norm, (row * spec.stride + spec.offset) / norm
        b = bbox[4 * c : 4 * c + 4, row, col]
        # DeepStream's DetectNet_v2 parser: rectX1f = (outputX1 - gcCentersX) * -bboxNormX, ...
        expected = [(b[0] - gx) * -norm, (b[1] - gy) * -norm, (b[2] + gx) * norm, (b[3] + gy) * norm]
        expected = np.clip(expected, 0, [INPUT_W, INPUT_H, INPUT_W, INPUT_H])
        np.testing.assert_allclose(box, expected, atol=1e-3)


def test_thresholds_are_per_class() -> None:
    cov, bbox = grid()
    put(cov, bbox, 0, 1, 1, 0.5, (0.3, 0.3, 0.3, 0.3))
    put(cov, bbox, 1, 2, 3, 0.7, (0.3, 0.3, 0.3, 0.3))
    assert sorted(decode(cov, bbox).class_ids.tolist()) == [0, 1]
    strict_car = SPEC.model_copy(update={"confidence_threshold": [0.6, 0.4]})
    assert decode(cov, bbox, strict_car).class_ids.tolist() == [1]
    strict_both = SPEC.model_copy(update={"confidence_threshold": [0.6, 0.8]})
    assert len(decode(cov, bbox, strict_both)) == 0
    on_threshold = SPEC.model_copy(update={"confidence_threshold": [0.5, 0.8]})
    assert decode(cov, bbox, on_threshold).class_ids.tolist() == [0]  # coverage >= threshold is kept
    with pytest.raises(ValueError, match="3 values for 2 classes"):
        decode(cov, bbox, SPEC.model_copy(update={"confidence_threshold": [0.1, 0.2, 0.3]}))


def test_boxes_are_clipped_to_the_input_and_small_ones_dropped() -> None:
    cov, bbox = grid()
    put(cov, bbox, 0, 0, 0, 0.9, (1.0, 1.0, 0.5, 0.5))  # reaches past the top-left corner
    put(cov, bbox, 0, 3, 4, 0.8, (0.05, 0.5, 0.05, 0.5))  # 3.5 px wide: under min_box_size
    put(cov, bbox, 1, 3, 4, 0.8, (0.06, 0.06, 0.06, 2.0))  # 4.2 x ~13.5 after clipping: kept
    d = decode(cov, bbox, image=(160, 128))
    assert d.class_ids.tolist() == [0, 1]
    # class 0: (0.5 - 35, 0.5 - 35, 0.5 + 17.5, 0.5 + 17.5) clipped to (0, 0, 18, 18), x2 scale
    np.testing.assert_allclose(d.boxes[0], [0, 0, 36, 36], atol=1e-4)
    # class 1 at centre (64.5, 48.5): y2 = 48.5 + 70 clipped to 64
    np.testing.assert_allclose(d.boxes[1], [2 * 62.4, 2 * 46.4, 2 * 66.6, 2 * 64.0], atol=1e-3)


def dets(boxes: list[list[float]], scores: list[float], classes: list[int]) -> Detections:
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(classes, np.int64))  # fmt: skip


def test_nms_uses_the_iou_threshold() -> None:
    # IoU of these two is 50 / 150 = 1/3.
    d = dets([[0, 0, 10, 10], [5, 0, 15, 10]], [0.9, 0.8], [0, 0])
    assert nms_per_class(d, 0.3, 10).scores.tolist() == pytest.approx([0.9])
    assert nms_per_class(d, 0.4, 10).scores.tolist() == pytest.approx([0.9, 0.8])


def test_nms_keeps_the_best_box_and_never_suppresses_across_classes() -> None:
    d = dets(
        [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]],
        [0.6, 0.95, 0.7, 0.5],
        [0, 0, 1, 0],
    )
    kept = nms_per_class(d, 0.5, 10)
    assert kept.scores.tolist() == pytest.approx([0.95, 0.7, 0.5])  # sorted by score
    assert kept.class_ids.tolist() == [0, 1, 0]
    np.testing.assert_allclose(kept.boxes[0], [1, 1, 10, 10])


def test_nms_caps_at_max_detections() -> None:
    d = dets([[i * 20, 0, i * 20 + 10, 10] for i in range(6)], [0.1, 0.6, 0.3, 0.9, 0.5, 0.2], [0] * 6)
    kept = nms_per_class(d, 0.5, 3)
    assert kept.scores.tolist() == pytest.approx([0.9, 0.6, 0.5])
    assert len(nms_per_class(Detections.empty(), 0.5, 3)) == 0


def reference_nms(d: Detections, iou_threshold: float) -> list[int]:
    """Textbook greedy NMS, pair by pair."""

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
        return w * h / union

    keep: list[int] = []
    for i in np.argsort(-d.scores, kind="stable"):
        if all(d.class_ids[i] != d.class_ids[k] or iou(d.boxes[i], d.boxes[k]) <= iou_threshold for k in keep):
            keep.append(int(i))
    return keep


def test_nms_matches_the_pairwise_reference_on_random_boxes() -> None:
    rng = np.random.default_rng(7)
    xy = rng.uniform(0, 200, (300, 2))
    wh = rng.uniform(5, 60, (300, 2))
    d = dets(np.hstack([xy, xy + wh]).tolist(), rng.uniform(0, 1, 300).tolist(), rng.integers(0, 3, 300).tolist())
    kept = nms_per_class(d, 0.45, 1000)
    expected = d.take(np.array(reference_nms(d, 0.45)))
    np.testing.assert_allclose(kept.boxes, expected.boxes)
    assert kept.class_ids.tolist() == expected.class_ids.tolist()


def test_postprocess_merges_neighbouring_cells_of_one_object() -> None:
    cov, bbox = grid()
    # One 40x40 object centred at (40, 32) seen by the four cells around its centre.
    for row, col, score in [(1, 2, 0.9), (1, 1, 0.6), (2, 2, 0.7), (2, 1, 0.5)]:
        cx, cy = col * 16 + 0.5, row * 16 + 0.5
        put(cov, bbox, 0, row, col, score, ((cx - 20) / 35, (cy - 12) / 35, (60 - cx) / 35, (52 - cy) / 35))
    put(cov, bbox, 1, 0, 4, 0.3, (0.5, 0.5, 0.5, 0.5))  # under the threshold
    d = postprocess_detector(cov, bbox, SPEC, input_width=INPUT_W, input_height=INPUT_H, image_width=800,
                             image_height=640)  # fmt: skip
    assert d.class_ids.tolist() == [0]
    np.testing.assert_allclose(d.scores, [0.9])
    np.testing.assert_allclose(d.boxes, [[200, 120, 600, 520]], atol=1e-2)
