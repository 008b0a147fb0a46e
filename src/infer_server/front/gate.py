"""The gate: what is decided about an ``InferenceService`` call before its request is received.

gRPC receives a request message whole before any handler runs, so a check made in the handler
comes after the bytes were taken in: sixty unauthenticated 60 MB pushes would cost the front
gigabytes before the first one is refused. A grpc.aio server interceptor runs when the call's
headers arrive, before its message: this one identifies the caller from the metadata (bearer
tokens) and refuses, without reading a byte of the message, a caller the server does not know and
a push from a caller whose in-flight bytes (or the server's) are already at their bound. A refused
call gets a handler that aborts at once and never asks for the request, so gRPC's flow control
stops the client after the first window of data.

The identity found here is handed to the handler through a context variable (the interceptor and
the handler run in the call's own task), so the token is checked once per call. Installed only
when there is something to decide before the message (a tokens file); with TLS client
certificates an unknown caller never completes the handshake in the first place.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_server.front import audit
from infer_server.front.errors import Overloaded, ServerError, Unauthenticated
from infer_server.front.identity import Identity

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer

CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("infer_caller", default=None)
# The services whose callers are identified here (health and reflection are open to anyone who can
# connect, and so are the Open Inference Protocol's liveness and readiness probes).
_PREFIXES = ("/infer.v1.InferenceService/", "/infer.v1.ModelControlService/", "/inference.GRPCInferenceService/")
_PROBES = ("/inference.GRPCInferenceService/ServerLive", "/inference.GRPCInferenceService/ServerReady")
# Calls that bring images: refused unread while the caller's byte budget is spent.
_PUSHES = ("/infer.v1.InferenceService/PushData", "/inference.GRPCInferenceService/ModelInfer",
           "/inference.GRPCInferenceService/ModelStreamInfer")  # fmt: skip


def _refusal(error: ServerError, method: str, identity: str | None) -> grpc.RpcMethodHandler:
    """A handler that answers ``error`` without ever reading the request (request-streaming, so
    grpc.aio does not receive a message before calling it), leaving an audit line."""

    async def refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
        audit.refused_call(context.peer(), method.rsplit("/", 1)[1], error.code, error.message, identity)
        await context.abort(error.code, error.message)

    return grpc.stream_stream_rpc_method_handler(refuse)


class Gate(grpc.aio.ServerInterceptor):
    """Identify the caller and check its push budget before its message is received."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if not method.startswith(_PREFIXES) or method in _PROBES:
            return await continuation(details)
        try:
            identity = self._server.authenticator.identify_metadata(details.invocation_metadata)
        except Unauthenticated as exc:
            return _refusal(exc, method, None)
        if identity is None:  # decided by the handler (TLS client certificates)
            return await continuation(details)
        if method in _PUSHES and (full := self._server.registry.bytes_budget_spent(identity.name)):
            return _refusal(Overloaded(full), method, identity.name)
        CALLER.set(identity)
        return await continuation(details)
