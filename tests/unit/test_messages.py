"""The records between the front and the workers survive the pipe exactly (compact pickled form)."""

from __future__ import annotations

import dataclasses
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest

from infer_server.messages import (
    AttributeRecord,
    Box,
    Code,
    DetectionRecord,
    FileRef,
    ImageOutcome,
    ImageRef,
    ItemDone,
    WorkItem,
    replaced,
)


def through_pipe(record: object) -> object:
    return pickle.loads(ForkingPickler.dumps(record))


def test_a_work_item_round_trips_with_its_images() -> None:
    refs = tuple(ImageRef(i, i * 100, 100, f"img-{i}") for i in range(8))
    file = FileRef("/dev/shm/infer/x.batch", 45, 123, 800, 17)
    item = WorkItem(7, "b" * 32, file, refs, 99.5, attempt=2, submitted=98.0)
    back = through_pipe(item)
    assert back == item and type(back) is WorkItem
    assert all(type(ref) is ImageRef for ref in back.images)  # type: ignore[attr-defined]
    with pytest.raises(dataclasses.FrozenInstanceError):
        back.attempt = 3  # type: ignore[attr-defined]


def test_item_done_round_trips_every_code_and_detections() -> None:
    det = DetectionRecord(0, "car", 0.9, Box(1.0, 2.0, 3.0, 4.0), (AttributeRecord("color", "red", 0.8),))
    outcomes = tuple(
        ImageOutcome("b", i, f"n{i}", code, "why" if code else "", 1280, 720, (det,) if code is Code.OK else (),
                     (("read", 0.1), ("queue", 2.0)), worker=3)  # fmt: skip
        for i, code in enumerate(Code)
    )
    done = ItemDone(worker=1, item_id=9, outcomes=outcomes)
    back = through_pipe(done)
    assert back == done and hash(back.outcomes[0]) == hash(outcomes[0])  # type: ignore[attr-defined]
    assert [o.code for o in back.outcomes] == list(Code)  # type: ignore[attr-defined]
    assert all(type(o.code) is Code for o in back.outcomes)  # type: ignore[attr-defined]
    assert through_pipe(ItemDone(1, 2)) == ItemDone(1, 2)


def test_replaced_is_dataclasses_replace_and_refuses_a_field_the_record_lacks() -> None:
    outcome = ImageOutcome("b", 1, "n", worker=3, timings_ms=(("read", 0.5),))
    changed = replaced(outcome, index=5, models=(("detector", "1"),), batch_images=8)
    assert changed == dataclasses.replace(outcome, index=5, models=(("detector", "1"),), batch_images=8)
    assert hash(changed) == hash(dataclasses.replace(outcome, index=5, models=(("detector", "1"),), batch_images=8))
    assert outcome.index == 1 and outcome.models == ()  # the original is untouched
    with pytest.raises(dataclasses.FrozenInstanceError):
        changed.index = 2  # type: ignore[misc]
    with pytest.raises(TypeError, match="no field"):
        replaced(outcome, indx=5)
    assert replaced(ImageRef(0, 10, 5, "a"), index=3) == ImageRef(3, 10, 5, "a")
