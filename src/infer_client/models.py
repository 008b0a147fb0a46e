"""Model control from a client: which models serve, and changing them (``infer.v1.ModelControlService``).

``ModelAdmin`` is what ``InferClient.models`` returns: ``list()``, ``load(name, version)``,
``unload(name)``, ``rollback(name)``, ``canary(name, version, share)``,
``shadow(name, version, share)``, each answering with every model's state (``ModelInfo``). A
change returns once every stage worker of the server serves the new models; a refused one raises
``InferError`` (FAILED_PRECONDITION with the reason, NOT_FOUND for an unknown model or version,
PERMISSION_DENIED for a caller the server does not let change models).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from infer_client._protocol import InferError
from infer_proto import infer_pb2, infer_pb2_grpc


@dataclass(frozen=True)
class ModelInfo:
    """One model of the server's repository."""

    name: str
    kind: str  # "detector" or "classifier"
    state: str  # "READY" or "UNLOADED"
    version: str  # serving; "" when unloaded
    versions: tuple[str, ...]  # in the repository
    pinned: str = ""  # chosen by an operator; "" when the version policy decides
    previous: str = ""  # what rollback returns to
    last_error: str = ""  # why the last change of it was refused
    candidate: str = ""  # the version under trial, if any, and its shares of batches
    canary_share: float = 0.0
    shadow_share: float = 0.0
    shadow_images: int = 0  # what the shadow runs found so far
    shadow_detection_agreement: float = 1.0
    shadow_attribute_agreement: float = 1.0
    shadow_skipped: int = 0

    @classmethod
    def from_proto(cls, msg: infer_pb2.ModelStatus) -> ModelInfo:
        return cls(
            msg.name, msg.kind, msg.state, msg.version, tuple(msg.versions), msg.pinned, msg.previous, msg.last_error,
            msg.candidate, msg.canary_share, msg.shadow_share, msg.shadow_images,
            msg.shadow_detection_agreement if msg.candidate else 1.0,
            msg.shadow_attribute_agreement if msg.candidate else 1.0, msg.shadow_skipped,
        )  # fmt: skip


@dataclass(frozen=True)
class DriftReport:
    """The server's drift watch (``GetDrift``)."""

    enabled: bool
    model: str
    version: str
    reference: str  # what the reference profile was computed on
    window_images: int
    window_size: int
    threshold: float
    flagged: bool
    statistics: dict[str, tuple[float, bool]]  # name -> (PSI, flagged); empty until the window fills


Models = list[ModelInfo]  # every model's state, as each call answers


class ModelAdmin:
    """The model-control calls of one client's channel."""

    def __init__(
        self, channel: grpc.Channel, metadata: Sequence[tuple[str, str]] | None, timeout: float | None
    ) -> None:
        self._stub = infer_pb2_grpc.ModelControlServiceStub(channel)
        self._metadata, self._timeout = tuple(metadata or ()), timeout

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Models:
        try:
            reply = method(request, timeout=timeout or self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise InferError.from_rpc(exc) from None
        return [ModelInfo.from_proto(m) for m in reply.models]

    def list(self) -> Models:
        return self._call(self._stub.ListModels, infer_pb2.ListModelsRequest(), None)

    def load(self, name: str = "", version: str = "", timeout: float | None = None) -> Models:
        """Serve ``version`` of ``name`` ("": the version policy's choice, the repository read again;
        no name: every model read again)."""
        return self._call(self._stub.LoadModel, infer_pb2.LoadModelRequest(name=name, version=version), timeout)

    def unload(self, name: str, timeout: float | None = None) -> Models:
        return self._call(self._stub.UnloadModel, infer_pb2.UnloadModelRequest(name=name), timeout)

    def rollback(self, name: str, timeout: float | None = None) -> Models:
        return self._call(self._stub.RollbackModel, infer_pb2.RollbackModelRequest(name=name), timeout)

    def canary(self, name: str, version: str, share: float, timeout: float | None = None) -> Models:
        """``version`` of ``name`` answers ``share`` of the batches (0 ends the canary)."""
        request = infer_pb2.TrialRequest(name=name, version=version, share=share)
        return self._call(self._stub.SetCanary, request, timeout)

    def shadow(self, name: str, version: str, share: float, timeout: float | None = None) -> Models:
        """``version`` of ``name`` also runs, unanswered, on ``share`` of the batches (0 ends it)."""
        request = infer_pb2.TrialRequest(name=name, version=version, share=share)
        return self._call(self._stub.SetShadow, request, timeout)

    def drift(self, timeout: float | None = None) -> DriftReport:
        """How far the images answered lately are from the detector's reference profile."""
        try:
            reply = self._stub.GetDrift(infer_pb2.DriftRequest(), timeout=timeout or self._timeout,
                                        metadata=self._metadata)  # fmt: skip
        except grpc.RpcError as exc:
            raise InferError.from_rpc(exc) from None
        return DriftReport(
            reply.enabled, reply.model, reply.version, reply.reference, reply.window_images, reply.window_size,
            reply.threshold, reply.flagged, {s.name: (s.psi, s.flagged) for s in reply.statistics},
        )  # fmt: skip
