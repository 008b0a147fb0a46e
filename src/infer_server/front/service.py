"""``InferenceService`` on grpc.aio: the three RPCs, thin, with errors leaving through ``rpc_boundary``.

* ``PushData``: one push, validated and admitted by ``InferenceServer.push``; answered with the
  batch id once the batch is queued.
* ``PullResult``: a ``PullCursor`` over the given batches; one ``ImageResult`` per image, in
  completion order, until every image was delivered.
* ``Session``: pushes in, answers and results out on one stream (``front.session``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import grpc.aio

from infer_proto import infer_pb2, infer_pb2_grpc
from infer_server.front.errors import rpc_boundary
from infer_server.front.session import SessionProtocol, outcome_to_proto, write_outcomes

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer


class InferenceServicer(infer_pb2_grpc.InferenceServiceServicer):
    """PushData / PullResult / Session of one ``InferenceServer``."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server

    @rpc_boundary
    async def PushData(
        self, request: infer_pb2.PushDataRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.PushDataReply:
        batch = await self._server.push(request, context.peer())
        return infer_pb2.PushDataReply(batch_id=batch.batch_id, image_count=batch.size)

    @rpc_boundary
    async def PullResult(self, request: infer_pb2.PullResultRequest, context: grpc.aio.ServicerContext) -> None:
        with self._server.registry.subscribe(request.batch_ids) as cursor:
            while (outcome := await cursor.next()) is not None:
                await write_outcomes(context, cursor, [outcome], outcome_to_proto(outcome))

    @rpc_boundary
    async def Session(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        with self._server.registry.open_session() as cursor:
            push = functools.partial(self._server.push, peer=context.peer())
            await SessionProtocol(context, push, cursor).run()
