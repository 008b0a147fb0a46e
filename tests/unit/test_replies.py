"""``infer_client._replies.image_results`` (C) against protobuf: the records it reads from a
reply's bytes are those ``ImageResult.from_proto`` makes of protobuf's parse of the same bytes,
whatever the bytes hold (fields repeated, merged, unknown, out of order; bytes damaged at random),
and what it does not read as protobuf would it refuses, which ``reply_results`` answers from
protobuf's parse instead."""

from __future__ import annotations

import random
import struct
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError

from infer_client import _replies
from infer_client.results import Attribute, Box, Detection, ImageResult, reply_results
from infer_proto import infer_pb2

pytestmark = pytest.mark.unit

TEXTS = ("", "a", "car", "né", "名前", "x" * 200, "\x00nul", "😀 emoji")
FLOATS = (0.0, -0.0, 0.5, -1.25, 1e-45, 3.4e38, float("inf"), float("-inf"), 0.1, 123456.789)


def by_protobuf(payload: bytes) -> list[ImageResult]:
    return [ImageResult.from_proto(result) for result in infer_pb2.SessionReply.FromString(payload).results]


def plain(value: Any) -> Any:
    """``value`` with its records, mappings and floats made comparable: a float by its bits (a NaN
    equals itself), a mapping as a dict (its order is protobuf's to choose)."""
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, (ImageResult, Detection, Box, Attribute)):
        return type(value), {name: plain(v) for name, v in vars(value).items()}
    if isinstance(value, (tuple, list)):
        return type(value), [plain(v) for v in value]
    if isinstance(value, MappingProxyType):
        return {k: plain(v) for k, v in value.items()}
    return value


def same(read: list[ImageResult], expected: list[ImageResult]) -> None:
    """Equal records, and equal down to the types of their fields (a mapping proxy, a tuple)."""
    assert plain(read) == plain(expected)
    for mine, theirs in zip(read, expected, strict=True):
        assert type(mine.timings_ms) is type(theirs.timings_ms) is MappingProxyType
        assert type(mine.model_versions) is MappingProxyType and type(mine.detections) is tuple
        for detection in mine.detections:
            assert type(detection) is Detection and type(detection.box) is Box
            assert type(detection.attributes) is MappingProxyType


def random_reply(rng: random.Random) -> infer_pb2.SessionReply:
    reply = infer_pb2.SessionReply()
    if rng.random() < 0.5:
        reply.answers.add(tag=rng.randrange(1, 1000), batch_id=rng.choice(TEXTS), image_count=rng.randrange(9))
    for _ in range(rng.randrange(6)):
        result = reply.results.add(
            batch_id=rng.choice(("s0-" + "ab" * 16, "b", "")), index=rng.choice((0, 1, 127, 128, 2**32 - 1)),
            name=rng.choice(TEXTS), width=rng.choice((0, 640, 2**32 - 1)), height=rng.choice((0, 480)),
            worker=rng.choice((-1, 0, 1, 2**31 - 1, -(2**31))), cached=rng.random() < 0.3,
        )  # fmt: skip
        if rng.random() < 0.8:
            result.status.code = rng.choice((0, 3, 4, 14, 16, 99, -5))
            result.status.message = rng.choice(TEXTS)
        for _ in range(rng.randrange(3)):
            detection = result.detections.add(class_id=rng.choice((0, 2, 2**32 - 1)), label=rng.choice(TEXTS),
                                              score=rng.choice(FLOATS))  # fmt: skip
            if rng.random() < 0.8:
                detection.box.x1, detection.box.y1 = rng.choice(FLOATS), rng.choice(FLOATS)
                detection.box.x2, detection.box.y2 = rng.choice(FLOATS), rng.choice(FLOATS)
            for _ in range(rng.randrange(3)):
                detection.attributes.add(model=rng.choice(("color", "type", "")), label=rng.choice(TEXTS),
                                         score=rng.choice(FLOATS))  # fmt: skip
        for _ in range(rng.randrange(4)):
            result.timings_ms[rng.choice(("read", "queue", "decode", ""))] = rng.choice(FLOATS)
        for _ in range(rng.randrange(3)):
            result.model_versions[rng.choice(("detector", "color", ""))] = rng.choice(("1", "2", ""))
    reply.completed.extend(rng.choice(TEXTS) for _ in range(rng.randrange(3)))
    return reply


def test_the_records_are_those_from_proto_makes() -> None:
    rng = random.Random(2026)
    for _ in range(400):
        payload = random_reply(rng).SerializeToString()
        same(_replies.image_results(payload, 2), by_protobuf(payload))


def test_a_batch_id_shared_by_results_is_one_string() -> None:
    reply = infer_pb2.SessionReply()
    for index in range(3):
        reply.results.add(batch_id="s1-batch", index=index)
    read = _replies.image_results(reply.SerializeToString(), 2)
    assert read[0].batch_id is read[1].batch_id is read[2].batch_id == "s1-batch"


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def delimited(field: int, content: bytes) -> bytes:
    return key(field, 2) + varint(len(content)) + content


def fixed32(field: int, value: float) -> bytes:
    return key(field, 5) + struct.pack("<f", value)


RESULT = delimited(1, b"b") + key(2, 0) + varint(7) + delimited(4, key(1, 0) + varint(3) + delimited(2, b"bad"))


@pytest.mark.parametrize(
    "result",
    [
        key(2, 0) + varint(1) + key(2, 0) + varint(9),  # a scalar twice: the last
        delimited(4, key(1, 0) + varint(3)) + delimited(4, delimited(2, b"why")),  # a message twice: merged
        delimited(4, key(1, 0) + varint(3)) + delimited(4, key(1, 0) + varint(0)),  # merged with a default
        # a box given twice, and attributes of one model twice (the last wins)
        delimited(7, delimited(4, fixed32(1, 1.5)) + delimited(4, fixed32(3, 2.5))
                  + delimited(5, delimited(1, b"m") + delimited(2, b"one")) + delimited(5, delimited(1, b"m"))),
        delimited(8, fixed32(2, 1.0)) + delimited(8, delimited(1, b"k")),  # map entries lacking key or value
        # unknown fields of every wire type, before and after known ones
        key(99, 0) + varint(5) + key(98, 1) + b"\x00" * 8 + RESULT + delimited(97, b"xyz") + fixed32(96, 1.0),
        key(9, 0) + varint(-1) + key(10, 0) + varint(2),  # a negative int32 (ten bytes), a bool of 2
        delimited(4, key(1, 0) + varint(-(2**31))),  # the smallest int32
        b"",  # every field at its default
    ],
)  # fmt: skip
def test_repeated_merged_and_unknown_fields_are_read_as_protobuf_reads_them(result: bytes) -> None:
    answer, completed = delimited(1, delimited(2, b"an answer")), delimited(3, b"done")
    payload = answer + delimited(2, result) + completed + delimited(2, RESULT)
    same(_replies.image_results(payload, 2), by_protobuf(payload))


@pytest.mark.parametrize(
    "result",
    [
        delimited(2, b"7"),  # a known field of another wire type (protobuf keeps it as unknown)
        key(5, 0) + varint(2**32),  # a uint32 beyond its range (protobuf cuts it to 32 bits)
        key(9, 0) + varint(2**31),  # an int32 beyond its range
        key(9, 0) + varint(2**32 - 1),  # -1 as a uint32 varint (protobuf reads -1)
        key(50, 3) + key(1, 0) + varint(1) + key(50, 4),  # a group
        delimited(8, fixed32(2, 1.0) + key(2, 0) + varint(1)),  # a map value of another wire type
        delimited(11, delimited(1, b"k") + delimited(2, b"1") + key(15, 0) + varint(4)),  # an unknown field in an entry
    ],
)
def test_what_it_does_not_read_as_protobuf_does_it_refuses_and_protobuf_answers(result: bytes) -> None:
    payload = delimited(2, RESULT) + delimited(2, result)
    expected = by_protobuf(payload)  # protobuf takes these bytes
    with pytest.raises(ValueError):
        _replies.image_results(payload, 2)
    same(reply_results(payload, infer_pb2.SessionReply.FromString(payload)), expected)


@pytest.mark.parametrize(
    "payload",
    [
        delimited(2, RESULT)[:-1],  # the bytes end inside a field
        delimited(2, delimited(1, b"\xff\xfe")),  # a string that is not UTF-8
        key(2, 2) + varint(1000) + b"abc",  # a length beyond the bytes
        key(2, 0) + b"\xff" * 11,  # a varint longer than ten bytes
        b"\x00",  # field number 0
    ],
)
def test_damaged_bytes_are_refused_by_both(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        infer_pb2.SessionReply.FromString(payload)
    with pytest.raises(ValueError):
        _replies.image_results(payload, 2)


def test_bytes_damaged_at_random_are_read_as_protobuf_reads_them_or_refused() -> None:
    """Whatever protobuf takes, the reader reads to the same records or refuses; it never reads
    past the bytes (a crash) or makes a different record."""
    rng = random.Random(7)
    read = refused = 0
    for _ in range(3000):
        payload = bytearray(random_reply(rng).SerializeToString() or delimited(2, RESULT))
        for _ in range(rng.randrange(1, 4)):
            at = rng.randrange(len(payload))
            action = rng.randrange(3)
            if action == 0:
                payload[at] = rng.randrange(256)
            elif action == 1:
                del payload[at:]
            else:
                payload[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
            if not payload:
                break
        try:
            expected = by_protobuf(bytes(payload))
        except DecodeError:
            continue
        try:
            records = _replies.image_results(bytes(payload), 2)
        except ValueError:
            refused += 1
            continue
        same(records, expected)
        read += 1
    assert read > 100 and refused >= 3, (read, refused)  # both ways taken (a map's bytes vary in order)


def test_the_field_number_is_checked_and_codes_map_as_from_proto_maps_them() -> None:
    for field in (0, -1, 2**29):
        with pytest.raises(ValueError):
            _replies.image_results(b"", field)
    assert _replies.image_results(b"", 2) == []
    payload = delimited(2, delimited(4, key(1, 0) + varint(99))) + delimited(2, delimited(4, key(1, 0) + varint(14)))
    codes = [r.code for r in _replies.image_results(payload, 2)]
    assert codes == [grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE]
