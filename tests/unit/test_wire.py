"""``infer_server._wire.image_results`` (C) against protobuf: the bytes it writes for a reply's
results parse to exactly the messages ``outcome_to_proto`` builds, for every kind of record, and
what protobuf refuses it refuses."""

from __future__ import annotations

import math
import random
import struct

import pytest

from infer_proto import infer_pb2
from infer_server._wire import image_results
from infer_server.front.session import outcome_to_proto
from infer_server.messages import AttributeRecord, Box, Code, DetectionRecord, ImageOutcome

TEXTS = ("", "a", "car", "né", "名前", "x" * 200, "\x00nul", "😀 emoji")
FLOATS = (0.0, -0.0, 0.5, -1.25, 1e-45, 3.4e38, 1e39, -1e39, math.inf, -math.inf, 0.1, 123456.789)


def by_protobuf(outcomes: list[ImageOutcome]) -> infer_pb2.SessionReply:
    reply = infer_pb2.SessionReply()
    for outcome in outcomes:
        outcome_to_proto(outcome, reply.results.add)
    return reply


def by_wire(outcomes: list[ImageOutcome]) -> infer_pb2.SessionReply:
    return infer_pb2.SessionReply.FromString(image_results(outcomes, 2))


def random_outcome(rng: random.Random) -> ImageOutcome:
    def detection() -> DetectionRecord:
        attributes = tuple(AttributeRecord(rng.choice(TEXTS), rng.choice(TEXTS), rng.choice(FLOATS))
                           for _ in range(rng.randrange(3)))  # fmt: skip
        box = Box(*(rng.choice(FLOATS) for _ in range(4)))
        return DetectionRecord(rng.choice((0, 1, 127, 128, 2**32 - 1)), rng.choice(TEXTS), rng.choice(FLOATS), box,
                               attributes)  # fmt: skip

    return ImageOutcome(
        batch_id=rng.choice(("", "0123456789abcdef" * 2, "b")),
        index=rng.choice((0, 1, 127, 128, 300, 2**32 - 1)),
        name=rng.choice(TEXTS),
        code=rng.choice(list(Code)),
        message=rng.choice(TEXTS),
        width=rng.choice((0, 1, 1280, 2**32 - 1)),
        height=rng.choice((0, 720, 2**31)),
        detections=tuple(detection() for _ in range(rng.randrange(4))),
        timings_ms=tuple((rng.choice(("read", "queue", "decode", "")), rng.choice(FLOATS))
                         for _ in range(rng.randrange(5))),  # fmt: skip
        worker=rng.choice((-1, 0, 1, 7, 2**31 - 1, -(2**31))),
        cached=rng.random() < 0.3,
        models=tuple((rng.choice(("detector", "color", "")), rng.choice(("1", "2", "")))
                     for _ in range(rng.randrange(3))),
    )  # fmt: skip


def test_the_wire_bytes_parse_to_what_protobuf_builds() -> None:
    rng = random.Random(2026)
    for _ in range(300):
        outcomes = [random_outcome(rng) for _ in range(rng.randrange(1, 6))]
        assert by_wire(outcomes) == by_protobuf(outcomes), outcomes


def test_fields_at_their_default_are_left_out_but_status_and_box_are_always_there() -> None:
    empty = by_wire([ImageOutcome("", 0, "", worker=0)]).results[0]
    assert [f.name for f, _ in empty.ListFields()] == ["status"]
    detection = DetectionRecord(0, "", 0.0, Box(0.0, 0.0, 0.0, 0.0))
    parsed = by_wire([ImageOutcome("", 0, "", worker=0, detections=(detection,))]).results[0].detections[0]
    assert [f.name for f, _ in parsed.ListFields()] == ["box"]


def test_a_float_is_rounded_to_single_precision_as_protobuf_rounds_it() -> None:
    for value in (0.1, 1 / 3, 3.4028235e38, 3.4028236e38, 1e39, -1e39, 5e-324):
        parsed = by_wire([ImageOutcome("b", 0, "", timings_ms=(("t", value),))]).results[0].timings_ms["t"]
        expected = by_protobuf([ImageOutcome("b", 0, "", timings_ms=(("t", value),))]).results[0].timings_ms["t"]
        assert struct.pack("<f", parsed) == struct.pack("<f", expected), value
    nan = by_wire([ImageOutcome("b", 0, "", timings_ms=(("t", math.nan),))]).results[0].timings_ms["t"]
    assert math.isnan(nan)


def test_the_last_of_repeated_map_keys_wins_as_in_protobuf() -> None:
    outcome = ImageOutcome("b", 0, "", timings_ms=(("read", 1.0), ("read", 2.0)), models=(("m", "1"), ("m", "2")))
    assert by_wire([outcome]) == by_protobuf([outcome])
    assert by_wire([outcome]).results[0].model_versions["m"] == "2"


@pytest.mark.parametrize(
    "outcome",
    [
        ImageOutcome("b", -1, ""),  # a negative uint32
        ImageOutcome("b", 2**32, ""),  # a uint32 too large
        ImageOutcome("b", 0, "", worker=2**31),  # an int32 too large
        ImageOutcome("b", 0, "\ud800"),  # a lone surrogate: not text
        ImageOutcome("b", 0, "", width=1.5),  # type: ignore[arg-type]  # not an integer
        ImageOutcome("b", 0, "", timings_ms=(("read",),)),  # type: ignore[arg-type]  # not a pair
        ImageOutcome("b", 0, "", timings_ms=(("read", "fast"),)),  # type: ignore[arg-type]  # not a number
    ],
)
def test_what_protobuf_refuses_is_refused(outcome: ImageOutcome) -> None:
    with pytest.raises((ValueError, TypeError)):
        by_protobuf([outcome])
    with pytest.raises((ValueError, TypeError)):
        image_results([outcome], 2)


def test_the_field_number_is_checked_and_an_empty_answer_is_empty() -> None:
    assert image_results([], 2) == b""
    for field in (0, -1, 2**29):
        with pytest.raises(ValueError):
            image_results([], field)
    reply = infer_pb2.SessionReply.FromString(image_results([ImageOutcome("b", 3, "")], 2))
    assert [r.index for r in reply.results] == [3]
