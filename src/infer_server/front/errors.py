"""Domain errors of the gRPC front and the one place that maps them to gRPC status codes.

Raised by ``handoff`` (validation of a pushed batch), ``batches`` (admission, unknown ids) and
``server`` (draining, a pool that refuses work); translated by :func:`rpc_boundary`, which wraps
every servicer method in the server's main process. Messages of these errors go to the client
verbatim, so they are written for a client: they never contain internal paths, pids or stack
traces. Anything else raised in a handler is a bug: it is logged with its traceback and the
client gets INTERNAL with a generic text.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import grpc.aio

log = logging.getLogger(__name__)


class ServerError(Exception):
    """Base of the errors a client may see; ``message`` is safe to send as the status detail."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidBatch(ServerError):
    """The request can never succeed as sent (bad sizes, limits, both/neither of path and data)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class PermissionDeniedError(ServerError):
    """The path escapes the shared directory, crosses a symlink or names a file others can write."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServerError):
    """No credentials, or ones the server does not know (a bearer token is required)."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Conflict(ServerError):
    """A request_id already bound to a different request."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Overloaded(ServerError):
    """Admitting the batch would exceed a bound of the server or of the caller's quota; the client
    should retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnknownBatch(ServerError):
    """A batch id that was never issued or whose results expired."""

    code = grpc.StatusCode.NOT_FOUND


class UnknownModel(ServerError):
    """No model of that name, or no such version of it, in the repository."""

    code = grpc.StatusCode.NOT_FOUND


class Refused(ServerError):
    """A model change that cannot be made (it did not load, nothing to roll back to, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Busy(Refused):
    """Another model change is under way."""


class Incomplete(ServerError):
    """A model change that is made (restarts load the new models) but did not finish in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(ServerError):
    """The server is starting, draining or its pipeline is down."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Unreadable:
    """A request message that was not parsed (over the size limit, or not a valid message): what
    ``service.reader`` hands the handler instead, which answers it INVALID_ARGUMENT."""

    reason: str
    tag: int = 0  # a Session push's tag, when it could be read from the message's first field
    defer_answer: bool = False


def status_for(exc: BaseException, where: str) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe detail for ``exc``; anything but a ``ServerError`` is a bug,
    logged here with its traceback (call this from the ``except`` block)."""
    if isinstance(exc, ServerError):
        return exc.code, exc.message
    log.exception("unexpected error in %s", where)
    return grpc.StatusCode.INTERNAL, "internal error"


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def rpc_boundary(handler: Handler) -> Handler:
    """Decorate an async servicer method (``self, request, context``) so no error escapes unmapped.

    Aborts raised by ``context.abort`` and cancellations pass through untouched; grpc.aio would
    otherwise report an escaped exception as UNKNOWN with its repr as the detail.
    """

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            code, message = status_for(exc, handler.__name__)
            await context.abort(code, message)

    return wrapper  # type: ignore[return-value]
