"""Typed, immutable results of ``PullResult`` and ``Session``, converted from the wire form.

Built by ``ImageResult.from_proto``, called by both clients (``client``, ``aio``) and their
sessions (``session``) in the client application's process; a Session's replies, on any
transport, are read by ``read_reply``, straight from their bytes (the ``_replies`` extension) to
the same records. ``Detection.attributes`` is a read-only mapping keyed by attribute model name
(``det.attributes["color"].label``); :meth:`ImageResult.to_dict` is the JSON shape the CLI prints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

import grpc

from infer_client import _replies
from infer_proto import infer_pb2

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a numeric code (UNKNOWN for values gRPC does not define)."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def _frozen_map(items: dict[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(items)


def _as_dict(entries: Mapping[str, Any]) -> dict[str, Any]:
    """A protobuf map as a dict. ``dict(entries)`` goes through ``Mapping``'s Python ``keys()``
    and ``__iter__`` for a map container: twice the cost of indexing it key by key."""
    return {key: entries[key] for key in entries}


T = TypeVar("T")
_new = object.__new__


def _built(cls: type[T], fields: dict[str, Any]) -> T:
    """An instance of the frozen dataclass ``cls`` from *every* one of its fields, without ``__init__``.

    A frozen dataclass's ``__init__`` sets each field through ``object.__setattr__``, which made it
    most of ``from_proto``'s cost (docs/performance.md), the client's largest per result after gRPC.
    No ``__post_init__`` runs: the result classes have none (a subclass that adds one, or fields,
    needs its own ``from_proto``).
    """
    obj = _new(cls)
    obj.__dict__.update(fields)
    return obj


@dataclass(frozen=True)
class Box:
    """Corners in original-image pixels."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class Attribute:
    """The top label of one attribute model for one detection."""

    model: str
    label: str
    score: float


@dataclass(frozen=True)
class Detection:
    class_id: int
    label: str
    score: float
    box: Box
    attributes: Mapping[str, Attribute] = field(default_factory=lambda: _frozen_map({}))

    @classmethod
    def from_proto(cls, msg: infer_pb2.Detection) -> Detection:
        b = msg.box
        attributes = {a.model: _built(Attribute, {"model": a.model, "label": a.label, "score": a.score})
                      for a in msg.attributes}  # fmt: skip
        return _built(cls, {
            "class_id": msg.class_id, "label": msg.label, "score": msg.score,
            "box": _built(Box, {"x1": b.x1, "y1": b.y1, "x2": b.x2, "y2": b.y2}),
            "attributes": _frozen_map(attributes),
        })  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "class_id": self.class_id,
            "label": self.label,
            "score": round(self.score, 6),
            "box": {k: round(v, 3) for k, v in zip(("x1", "y1", "x2", "y2"), self.box.as_tuple(), strict=True)},
            "attributes": {m: {"label": a.label, "score": round(a.score, 6)} for m, a in self.attributes.items()},
        }


@dataclass(frozen=True)
class ImageResult:
    """The one terminal record of one image: detections, or a per-image error (``ok`` is False)."""

    batch_id: str
    index: int
    name: str
    code: grpc.StatusCode
    message: str
    width: int
    height: int
    detections: tuple[Detection, ...] = ()
    timings_ms: Mapping[str, float] = field(default_factory=lambda: _frozen_map({}))
    worker: int = -1
    cached: bool = False  # answered from the server's result cache
    model_versions: Mapping[str, str] = field(default_factory=lambda: _frozen_map({}))  # model name -> version

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK

    @classmethod
    def from_proto(cls, msg: infer_pb2.ImageResult) -> ImageResult:
        status, timings, versions = msg.status, msg.timings_ms, msg.model_versions
        return _built(cls, {
            "batch_id": msg.batch_id, "index": msg.index, "name": msg.name,
            "code": status_code(status.code), "message": status.message,
            "width": msg.width, "height": msg.height,
            "detections": tuple(map(Detection.from_proto, msg.detections)) if msg.detections else (),
            "timings_ms": _frozen_map(_as_dict(timings)), "worker": msg.worker, "cached": msg.cached,
            "model_versions": _frozen_map(_as_dict(versions) if versions else {}),
        })  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the ImageResult fields, attributes as ``{"color": {"label", "score"}}``."""
        return {
            "batch_id": self.batch_id,
            "index": self.index,
            "name": self.name,
            "status": {"code": self.code.value[0], "name": self.code.name, "message": self.message},
            "width": self.width,
            "height": self.height,
            "detections": [d.to_dict() for d in self.detections],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
            "worker": self.worker,
            "cached": self.cached,
            "model_versions": dict(self.model_versions),
        }


_replies.configure(ImageResult, Detection, Box, Attribute, _CODES, grpc.StatusCode.UNKNOWN)
_RESULTS_FIELD = infer_pb2.SessionReply.DESCRIPTOR.fields_by_name["results"].number


def read_reply(payload: bytes) -> tuple[infer_pb2.SessionReply, list[ImageResult]]:
    """A Session's reply from its bytes: protobuf's message, and its results as records
    (``reply_results``). ``DecodeError`` if the bytes are not a reply."""
    reply = infer_pb2.SessionReply.FromString(payload)
    return reply, reply_results(payload, reply) if reply.results else []


def reply_results(payload: bytes, reply: infer_pb2.SessionReply) -> list[ImageResult]:
    """The results of the serialized SessionReply ``payload`` (``reply``: protobuf's parse of it),
    read by the C reader where it can, which makes the records ``from_proto`` would at a fraction
    of the cost; from ``reply`` where it refuses the bytes (``_replies.c`` says when)."""
    try:
        return _replies.image_results(payload, _RESULTS_FIELD)
    except ValueError:
        return [ImageResult.from_proto(result) for result in reply.results]
