"""Shadow agreement (matched boxes at IoU >= 0.5, labels, attributes) and the shadow budget."""

from __future__ import annotations

from infer_server.messages import Agreement, AttributeRecord, Box, Code, DetectionRecord, ImageOutcome, ImageRef
from infer_server.stage.shadow import Budget, compare, compare_image


def det(x: float, label: str = "car", color: str = "red") -> DetectionRecord:
    return DetectionRecord(0, label, 0.9, Box(x, 0, x + 10, 10), (AttributeRecord("color", color, 0.8),))


def test_identical_detections_agree_everywhere() -> None:
    found = compare_image([det(0), det(50)], [det(50), det(0)])
    assert (found.matched, found.labels_agree, found.attributes_compared, found.attributes_agree) == (2, 2, 2, 2)
    assert found.detection_agreement == found.attribute_agreement == 1.0


def test_boxes_match_one_to_one_at_iou_one_half() -> None:
    assert compare_image([det(0)], [det(3)]).matched == 1  # IoU 7/13 > 0.5
    assert compare_image([det(0)], [det(4)]).matched == 0  # IoU 6/14 < 0.5
    two_for_one = compare_image([det(0)], [det(0), det(1)])
    assert (two_for_one.matched, two_for_one.detection_agreement) == (1, 2 / 3)


def test_labels_and_attributes_disagree_separately() -> None:
    found = compare_image([det(0, "car", "red")], [det(0, "truck", "blue")])
    assert (found.matched, found.labels_agree, found.attributes_compared, found.attributes_agree) == (1, 0, 1, 0)
    assert found.detection_agreement == 0.0 and found.attribute_agreement == 0.0


def test_nothing_found_by_both_is_agreement_and_by_one_is_not() -> None:
    assert compare_image([], []).detection_agreement == 1.0
    assert compare_image([det(0)], []).detection_agreement == 0.0


def test_only_images_both_answered_are_compared() -> None:
    ok = ImageOutcome("b", 0, "a", detections=(det(0),))
    failed = ImageOutcome.failed("b", ImageRef(1, 0, 1), Code.INVALID_ARGUMENT, "bad")
    total = compare([ok, failed], [ok, ImageOutcome("b", 1, "x")])
    assert total.images == 1 and total.labels_agree == 1
    summed = Agreement()
    summed.add(total)
    summed.add(total)
    assert (summed.images, summed.stable_detections) == (2, 2)


def test_the_budget_keeps_shadow_time_within_its_share_of_the_answered_time() -> None:
    budget = Budget(0.1)
    ran = 0
    for _ in range(100):
        budget.answered(1.0)  # every chunk answered takes a second
        if budget.allows():
            budget.spent(1.0)  # and its shadow run as long again
            ran += 1
    assert 9 <= ran <= 11 and budget.shadow_s <= 0.1 * budget.answered_s + 1.0
