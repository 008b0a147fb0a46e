"""The records between the front and the workers survive the pipe exactly: marshalled rows for the
two that cross per chunk, pickles for the rest, and what ``Connection.send`` pickles reads too."""

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
    WorkerReady,
    WorkItem,
    dumps,
    loads,
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


def test_the_per_chunk_records_go_as_marshalled_rows_and_the_rest_as_pickles() -> None:
    file = FileRef("/dev/shm/infer/x.batch", 45, 123, 800, 17)
    item = WorkItem(7, "b" * 32, file, (ImageRef(0, 0, 100, "é"),), 99.5, route=2)
    plain = ImageOutcome("b", 0, "", width=4, timings_ms=(("read", 0.1),), digest=b"\x00\xff", models=(("m", "1"),),
                         input_stats=(0.5, 0.25), worker=2)  # fmt: skip
    detected = replaced(plain, detections=(DetectionRecord(1, "car", 0.5, Box(0.0, 0.0, 1.0, 1.0)),))
    answers = (ItemDone(1, 2, (plain,)), ItemDone(1, 3, (replaced(plain, index=1, code=Code.NOT_FOUND),)))
    for message, kind in ((item, b"W"), (answers, b"D"), ((ItemDone(1, 2, (detected,)),), b"\x80"),
                          (WorkerReady(1, 2), b"\x80"), (None, b"\x80")):  # fmt: skip
        data = dumps(message)
        assert data[:1] == kind
        back = loads(memoryview(data))  # the result reader hands a view of its buffer
        assert back == message
    assert type(loads(dumps(answers))[1].outcomes[0].code) is Code
    assert loads(ForkingPickler.dumps(WorkerReady(1, 2)).tobytes()) == WorkerReady(1, 2)  # Connection.send's
    with pytest.raises(ValueError):  # garbage after a marshal kind byte
        loads(b"W\xff\x00")


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
