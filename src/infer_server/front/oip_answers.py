"""The answers of the Open Inference Protocol's one model, ``pipeline`` (``front.oip`` serves it):
its outputs built from the images' outcomes as raw little-endian tensors, the response that
carries them, and the statistics ``ModelStatistics`` reports. The front never imports numpy:
``array`` packs the tensors."""

from __future__ import annotations

import array
import json
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

from infer_proto import inference_pb2
from infer_server.front.regions import bytes_elements
from infer_server.messages import ImageOutcome

MODEL, VERSION, INPUT = "pipeline", "1", "IMAGES"
OUTPUTS = {
    "DETECTIONS": ("BYTES", [-1]), "STATUS": ("INT32", [-1]), "COUNT": ("INT32", [-1]),
    "BOXES": ("FP32", [-1, -1, 4]), "SCORES": ("FP32", [-1, -1]), "CLASSES": ("INT32", [-1, -1]),
}  # fmt: skip


def split_bytes(raw: bytes | memoryview, count: int) -> list[bytes | memoryview]:
    """The ``count`` elements of a BYTES tensor's raw form (``regions.bytes_elements``)."""
    view = memoryview(raw)
    return [view[o : o + n] for o, n in bytes_elements(lambda pos: bytes(view[pos : pos + 4]), 0, len(view), count)]


def _bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def detection_json(outcome: ImageOutcome) -> bytes:
    detections = [
        {
            "label": d.label,
            "class_id": d.class_id,
            "score": d.score,
            "box": [d.box.x1, d.box.y1, d.box.x2, d.box.y2],
            "attributes": {a.model: {"label": a.label, "score": a.score} for a in d.attributes},
        }  # fmt: skip
        for d in outcome.detections
    ]
    doc = {"status": {"code": int(outcome.code), "message": outcome.message}, "width": outcome.width,
           "height": outcome.height, "detections": detections, "model_versions": dict(outcome.models)}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


def tensors(outcomes: Sequence[ImageOutcome]) -> dict[str, tuple[bytes, list[int]]]:
    """Every output of one request, raw and little-endian, with its shape (the front never imports
    numpy: ``array`` packs them)."""
    n, k = len(outcomes), max((len(o.detections) for o in outcomes), default=0)
    boxes, scores, classes = array.array("f", bytes(16 * n * k)), array.array("f", bytes(4 * n * k)), array.array(
        "i", bytes(4 * n * k))  # fmt: skip
    for i, outcome in enumerate(outcomes):
        for j, d in enumerate(outcome.detections):
            boxes[4 * (i * k + j) : 4 * (i * k + j) + 4] = array.array("f", (d.box.x1, d.box.y1, d.box.x2, d.box.y2))
            scores[i * k + j], classes[i * k + j] = d.score, d.class_id
    return {
        "DETECTIONS": (_bytes_tensor([detection_json(o) for o in outcomes]), [n]),
        "STATUS": (array.array("i", (int(o.code) for o in outcomes)).tobytes(), [n]),
        "COUNT": (array.array("i", (len(o.detections) for o in outcomes)).tobytes(), [n]),
        "BOXES": (boxes.tobytes(), [n, k, 4]),
        "SCORES": (scores.tobytes(), [n, k]),
        "CLASSES": (classes.tobytes(), [n, k]),
    }


def response(
    request_id: str, built: Mapping[str, tuple[bytes, list[int]]], wanted: Sequence[str],
    into: Mapping[str, Any] | None = None,
) -> inference_pb2.ModelInferResponse:  # fmt: skip
    """The answer to one request: every output asked for (all when none is named). One written into
    a shared-memory region (``into``: its parameters) says where, with no raw bytes of its own (an
    empty entry keeps the others at their positions, as clients index them)."""
    reply = inference_pb2.ModelInferResponse(model_name=MODEL, model_version=VERSION, id=request_id)
    for name in wanted or OUTPUTS:
        data, shape = built[name]
        output = reply.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=shape)
        if into and name in into:
            for key, value in into[name].items():
                output.parameters[key].CopyFrom(value)
            reply.raw_output_contents.append(b"")
        else:
            reply.raw_output_contents.append(data)
    return reply


class Statistics:
    """What ``ModelStatistics`` reports for ``pipeline``: requests and images, durations in ns.

    Besides success and failure, Triton's phases, from the stage times the workers return (what
    load tools such as perf_analyzer read to split latency): ``queue`` (waiting for a worker),
    ``compute_input`` (reading and decoding), ``compute_infer`` (the models, NMS and crops) and
    ``compute_output`` (none: results are turned into tensors by the front, inside ``success``). A
    request's phase is its images' sum, counted once per answered request."""

    PHASES = ("queue", "compute_input", "compute_infer", "compute_output")
    _PHASE_OF = {"queue": "queue", "read": "compute_input", "decode": "compute_input"}

    def __init__(self) -> None:
        self.success = [0, 0]  # requests answered, their total time
        self.fail = [0, 0]
        self.phases = {phase: [0, 0] for phase in self.PHASES}
        self.images = 0
        self.last_ms = 0

    def record(self, outcomes: list[ImageOutcome], seconds: float) -> None:
        entry = self.success if outcomes else self.fail
        entry[0] += 1
        entry[1] += int(seconds * 1e9)
        self.images += len(outcomes)
        self.last_ms = int(time.time() * 1000)
        if not outcomes:
            return
        ms = dict.fromkeys(self.PHASES, 0.0)
        for outcome in outcomes:
            for stage, value in outcome.timings_ms:
                ms[self._PHASE_OF.get(stage, "compute_infer")] += value
        for phase, value in ms.items():
            self.phases[phase][0] += 1
            self.phases[phase][1] += int(value * 1e6)

    def message(self) -> Any:
        durations = {name: inference_pb2.StatisticDuration(count=c, ns=ns) for name, (c, ns) in self.phases.items()}
        return inference_pb2.InferStatistics(
            success=inference_pb2.StatisticDuration(count=self.success[0], ns=self.success[1]),
            fail=inference_pb2.StatisticDuration(count=self.fail[0], ns=self.fail[1]),
            **durations,
        )
