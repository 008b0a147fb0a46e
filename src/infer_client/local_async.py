"""The Session call on the local socket for ``AsyncInferClient`` (``--local-socket``).

``AsyncLocalCall`` is shaped as the grpc.aio stream-stream call ``session.AsyncSession`` drives,
so the asyncio client's sessions run over the local socket with the same code as over gRPC;
``AsyncLocalStub`` makes them. The framing and its checks are ``local.LocalSession``'s.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import grpc

from infer_client.local import CALL, SESSION, _served_by, ended_with, start_frame, unexpected
from infer_client.session import _ENDED, Metadata
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, frame


class LocalCallError(grpc.RpcError):
    """A local call's failure, as ``grpc.aio`` raises one: ``code()`` and ``details()``."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class AsyncLocalCall:
    """The Session call on the local socket, shaped as ``session.AsyncSession`` uses a grpc.aio
    stream-stream call: ``write`` (waiting for the window), ``done_writing``, ``cancel`` and the
    replies by ``async for`` (which also takes in the window's grants). ``AsyncSession`` writes one
    message at a time and always reads, so the window is taken and spent in order."""

    def __init__(self, path: str | os.PathLike[str], metadata: Metadata, stub: AsyncLocalStub | None = None) -> None:
        self._window = 0
        self._news = asyncio.Event()  # a grant, or the end of the call
        self._error: LocalCallError | None = None  # writes fail with it once the call is over
        self._connected = asyncio.ensure_future(self._connect(path, metadata, stub))

    @staticmethod
    async def _connect(path: str | os.PathLike[str], metadata: Metadata, stub: AsyncLocalStub | None
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(path))
            try:
                uid = _served_by(writer.get_extra_info("socket"), stub.server_uid if stub else None)
            except OSError:
                writer.close()
                raise
        except OSError as exc:
            raise LocalCallError(grpc.StatusCode.UNAVAILABLE, f"cannot reach the local socket {path}: {exc}") from None
        if stub is not None:
            stub.server_uid = uid
        writer.write(start_frame(SESSION, metadata))
        return reader, writer

    async def write(self, request: infer_pb2.SessionRequest) -> None:
        _, writer = await self._connected
        message = frame(CALL, Kind.MESSAGE, request.SerializeToString())
        while self._window <= 0 and self._error is None:
            self._news.clear()
            await self._news.wait()
        if self._error is not None:
            raise self._error
        self._window -= len(message)
        await self._send(writer, message)

    async def done_writing(self) -> None:
        _, writer = await self._connected
        if self._error is None:
            self._error = LocalCallError(grpc.StatusCode.CANCELLED, "the session is closed")
            await self._send(writer, frame(CALL, Kind.HALF_CLOSE))

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, data: bytes) -> None:
        try:
            writer.write(data)
            await writer.drain()
        except OSError as exc:
            raise LocalCallError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc}") from None

    def cancel(self) -> None:
        if not self._connected.done():
            self._connected.cancel()
        elif not self._connected.cancelled() and self._connected.exception() is None:
            self._connected.result()[1].transport.abort()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[bytes]:
        try:
            reader, _ = await self._connected
            while True:
                call, kind, length = HEADER.unpack(await reader.readexactly(HEADER.size))
                if reason := unexpected(call, length):
                    raise LocalCallError(grpc.StatusCode.INTERNAL, reason)
                payload = await reader.readexactly(length)
                if kind == Kind.WANT:
                    self._window += int(payload)
                    self._news.set()
                elif kind == Kind.MESSAGE:
                    yield payload  # a reply's bytes, which AsyncSession reads
                elif kind == Kind.END:
                    if error := ended_with(payload):
                        raise LocalCallError(error.code, error.message)
                    return
        except (asyncio.IncompleteReadError, OSError) as exc:
            raise LocalCallError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc!r}") from None
        finally:
            self._error = self._error or LocalCallError(grpc.StatusCode.CANCELLED, _ENDED)
            self._news.set()
            self.cancel()


class AsyncLocalStub:
    """What ``AsyncSession`` asks of a stub (``Session(metadata=...)``), for the local socket."""

    def __init__(self, path: str | os.PathLike[str], server_uid: int | None = None) -> None:
        """``server_uid``: the uid the server must run as; else the first call's server sets it."""
        self._path, self.server_uid = path, server_uid

    def Session(self, metadata: Metadata = None) -> AsyncLocalCall:  # noqa: N802 - the stub's method name
        return AsyncLocalCall(self._path, metadata, self)


__all__ = ["AsyncLocalCall", "AsyncLocalStub", "LocalCallError"]
