"""The client's typed results, converted from the wire form (infer_client.results)."""

import dataclasses
import types

import grpc
import pytest

from infer_client.results import Attribute, Box, Detection, ImageResult
from infer_proto import infer_pb2

pytestmark = pytest.mark.unit


def _wire(code: int = 0) -> infer_pb2.ImageResult:
    msg = infer_pb2.ImageResult(batch_id="b1", index=3, name="cam-7.jpg", width=1280, height=720, worker=1)
    msg.status.code = code
    msg.status.message = "" if code == 0 else "image 3: not a JPEG"
    msg.timings_ms.update({"read": 0.25, "detector": 11.5})
    det = msg.detections.add(class_id=2, label="car", score=0.875)
    det.box.x1, det.box.y1, det.box.x2, det.box.y2 = 10.0, 20.0, 110.5, 220.25
    det.attributes.add(model="color", label="red", score=0.5)
    det.attributes.add(model="vehicle_type", label="sedan", score=0.75)
    msg.detections.add(class_id=0, label="person", score=0.5, box=infer_pb2.Box(x1=1, y1=2, x2=3, y2=4))
    return infer_pb2.ImageResult.FromString(msg.SerializeToString())


def test_from_proto_equals_the_result_built_field_by_field() -> None:
    expected = ImageResult(
        batch_id="b1", index=3, name="cam-7.jpg", code=grpc.StatusCode.OK, message="", width=1280, height=720,
        detections=(
            Detection(2, "car", 0.875, Box(10.0, 20.0, 110.5, 220.25), types.MappingProxyType({
                "color": Attribute("color", "red", 0.5), "vehicle_type": Attribute("vehicle_type", "sedan", 0.75),
            })),
            Detection(0, "person", 0.5, Box(1.0, 2.0, 3.0, 4.0)),
        ),
        timings_ms=types.MappingProxyType({"read": 0.25, "detector": 11.5}), worker=1,
    )  # fmt: skip
    got = ImageResult.from_proto(_wire())
    assert got == expected
    assert got.ok and got.detections[0].attributes["color"].label == "red"
    assert got.detections[0].box.width == pytest.approx(100.5)


def test_from_proto_sets_every_field_and_stays_frozen() -> None:
    got = ImageResult.from_proto(_wire())
    det = got.detections[0]
    for obj in (got, det, det.box, det.attributes["color"]):
        assert set(vars(obj)) == {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
        with pytest.raises(dataclasses.FrozenInstanceError):
            obj.label = "changed"  # type: ignore[union-attr]
    with pytest.raises(TypeError):
        got.timings_ms["read"] = 0.0  # type: ignore[index]


def test_from_proto_of_an_error_and_of_an_unknown_code() -> None:
    failed = ImageResult.from_proto(_wire(code=3))
    assert not failed.ok and failed.code is grpc.StatusCode.INVALID_ARGUMENT
    assert failed.message == "image 3: not a JPEG"
    assert ImageResult.from_proto(_wire(code=99)).code is grpc.StatusCode.UNKNOWN
    assert ImageResult.from_proto(infer_pb2.ImageResult()).detections == ()
