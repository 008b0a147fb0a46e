"""``infer.v1.ModelControlService`` on grpc.aio: thin handlers over ``front.control.ModelControl``.

Listing is open to every caller the server accepts; the calls that change models need an
operator (``ModelControl.check_caller``), and a refused one leaves an audit line.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_proto import infer_pb2
from infer_server.front import audit
from infer_server.front.control import ModelControl
from infer_server.front.errors import PermissionDeniedError, rpc_boundary
from infer_server.front.identity import Identity

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer

CONTROL_SERVICE = infer_pb2.DESCRIPTOR.services_by_name["ModelControlService"].full_name


async def status(control: ModelControl, operator: bool) -> infer_pb2.ListModelsReply:
    """Every model's state, as each call answers; why changes were refused only for an operator
    (a worker's reason may name places on the host)."""
    catalog = await asyncio.to_thread(control.catalog)  # lists the repository's directories
    serving, chosen = control.serving(), control.chosen
    agreement, skipped = await control.shadow_seen()
    reply = infer_pb2.ListModelsReply()
    for name, kind, versions in catalog:
        model = reply.models.add(
            name=name, kind=kind, state="READY" if name in serving else "UNLOADED",
            version=serving.get(name, ""), versions=versions, pinned=chosen.pins.get(name, ""),
            previous=control.previous.get(name, ""), last_error=control.errors.get(name, "") if operator else "",
        )  # fmt: skip
        if chosen.trial is not None and chosen.trial[0] == name:
            model.candidate, model.canary_share, model.shadow_share = chosen.trial[1], chosen.canary, chosen.shadow
            model.shadow_images, model.shadow_skipped = agreement.images, skipped
            model.shadow_detection_agreement = agreement.detection_agreement
            model.shadow_attribute_agreement = agreement.attribute_agreement
    return reply


class ModelControlServicer:
    """``infer.v1.ModelControlService`` of one server (``ModelControl`` does the work)."""

    def __init__(self, server: InferenceServer, control: ModelControl, identify: Callable[..., Identity]) -> None:
        self._server, self._control, self._identify = server, control, identify

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(method: Callable[..., Any], request: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request.FromString, infer_pb2.ListModelsReply.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            CONTROL_SERVICE,
            {
                "ListModels": unary(self.ListModels, infer_pb2.ListModelsRequest),
                "LoadModel": unary(self.LoadModel, infer_pb2.LoadModelRequest),
                "UnloadModel": unary(self.UnloadModel, infer_pb2.UnloadModelRequest),
                "RollbackModel": unary(self.RollbackModel, infer_pb2.RollbackModelRequest),
                "SetCanary": unary(self.SetCanary, infer_pb2.TrialRequest),
                "SetShadow": unary(self.SetShadow, infer_pb2.TrialRequest),
                "GetDrift": grpc.unary_unary_rpc_method_handler(
                    self.GetDrift, infer_pb2.DriftRequest.FromString, infer_pb2.DriftReply.SerializeToString
                ),
            },
        )

    def _operator(self, context: grpc.aio.ServicerContext, rpc: str) -> str:
        identity = self._identify(context, rpc)
        try:
            self._control.check_caller(identity)
        except PermissionDeniedError as exc:
            audit.refused_call(context.peer(), rpc, exc.code, exc.message, identity.name)
            raise
        return identity.name

    @rpc_boundary
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        identity = self._identify(context, "ListModels")
        return await status(self._control, self._control.may_change(identity))

    @rpc_boundary
    async def LoadModel(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        await self._control.load(request.name, request.version, self._operator(context, "LoadModel"))
        return await status(self._control, True)

    @rpc_boundary
    async def UnloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        await self._control.unload(request.name, self._operator(context, "UnloadModel"))
        return await status(self._control, True)

    @rpc_boundary
    async def RollbackModel(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        await self._control.rollback(request.name, self._operator(context, "RollbackModel"))
        return await status(self._control, True)

    @rpc_boundary
    async def SetCanary(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        who = self._operator(context, "SetCanary")
        await self._control.trial(request.name, request.version, request.share, "canary", who)
        return await status(self._control, True)

    @rpc_boundary
    async def SetShadow(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        who = self._operator(context, "SetShadow")
        await self._control.trial(request.name, request.version, request.share, "shadow", who)
        return await status(self._control, True)

    @rpc_boundary
    async def GetDrift(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.DriftReply:
        self._identify(context, "GetDrift")
        m = self._server.drift
        reply = infer_pb2.DriftReply(
            enabled=m.enabled, model=m.model[0], version=m.model[1], reference=m.source, window_images=m.images,
            window_size=m.window, threshold=m.threshold, flagged=m.flagged,
        )  # fmt: skip
        for name, score in sorted(m.scores.items()):
            reply.statistics.add(name=name, psi=score.psi, flagged=score.flagged)
        return reply
