"""The asyncio client: the same surface as ``InferClient``, awaitable, on ``grpc.aio``.

Used by asyncio applications and by ``infer-client batch`` (several batches in flight from one
event loop). Requests come from the shared builder in ``_protocol``; writing a tmpfs batch file
runs in a thread so the loop never blocks on file I/O. Example::

    async with AsyncInferClient("localhost:8001") as client:
        await client.wait_ready(timeout=30)
        results = await client.detect(["a.jpg", "b.jpg"])
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infer_client._protocol import (
    CHANNEL_OPTIONS,
    DEFAULT_SHM_DIR,
    BatchFiles,
    Credentials,
    ImageSource,
    InferError,
    PushedBatches,
    ReadyWait,
    Transport,
    open_channel,
    prepare_push,
    pull_request,
    resolve_transport,
    session_stub,
)
from infer_client.local_pull import pull_shards_async, push_on_shard, shard_count
from infer_client.results import ImageResult
from infer_client.routed import AsyncRoutedSession
from infer_client.session import AsyncSession
from infer_proto import infer_pb2_grpc

_SERVING = health_pb2.HealthCheckResponse.SERVING


class AsyncInferClient:
    """Asyncio client for ``infer.v1.InferenceService``; ``await close()`` (or ``async with``)."""

    def __init__(
        self,
        target: str,
        *,
        shm_dir: str | os.PathLike[str] = DEFAULT_SHM_DIR,
        transport: Transport = "auto",
        timeout: float | None = 120.0,
        credentials: Credentials | None = None,
        local_socket: str | os.PathLike[str] | None = None,
    ) -> None:
        """``local_socket``: the server's ``--local-socket``; sessions (and ``detect``) then run over it,
        without gRPC (``infer_client.local``); the other calls go to ``target``."""
        self.target = target
        self.local_socket = local_socket
        self.shm_dir = os.fspath(shm_dir)
        self.transport = resolve_transport(transport, target, self.shm_dir)
        self.timeout = timeout
        self.credentials = credentials or Credentials()
        self._metadata = self.credentials.metadata
        self._channel = open_channel(target, CHANNEL_OPTIONS, self.credentials, aio=True)
        self._stub = infer_pb2_grpc.InferenceServiceStub(self._channel)
        self._sessions = session_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._pushed = PushedBatches(BatchFiles(self.shm_dir))
        self._session: AsyncSession | AsyncRoutedSession | None = None
        self._shard_count: tuple[int, int] | None = None  # of the server behind local_socket, once asked

    async def push(
        self,
        images: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Hand over a batch (paths or encoded bytes); returns its batch id at once (with a
        ``request_id``, on the id's shard: ``InferClient.push``)."""
        prepared = await asyncio.to_thread(prepare_push, images, names, request_id, self.transport, self._pushed.files)
        pushing: asyncio.Future[str] | None = None  # the push on a shard's socket, in a thread

        def discard(*_: object) -> None:
            self._pushed.files.discard(prepared.owned_path)  # whether or not the server took it, nobody will pull it

        try:
            if request_id and self.local_socket is not None and (sharding := await self._shards())[0] > 1:
                args = (self.local_socket, prepared.request, sharding, self._metadata, self.timeout)
                pushing = asyncio.ensure_future(asyncio.to_thread(push_on_shard, *args))
                batch_id = await asyncio.shield(pushing)
            else:
                reply = await self._stub.PushData(prepared.request, timeout=self.timeout, metadata=self._metadata)
                batch_id = reply.batch_id
        except grpc.RpcError as exc:
            discard()
            raise InferError.from_rpc(exc) from None
        except (InferError, asyncio.CancelledError):
            if pushing is not None and not pushing.done():  # the thread still sends it: its file goes after
                pushing.add_done_callback(lambda done: done.cancelled() or done.exception() or True)
                pushing.add_done_callback(discard)
            else:
                discard()
            raise
        self._pushed.add(batch_id, prepared.owned_path, len(images))
        return batch_id

    async def pull(self, batch_ids: str | Sequence[str], timeout: float | None = None) -> AsyncIterator[ImageResult]:
        """Results of the batches in completion order; ends when every image was answered."""
        request = pull_request(batch_ids)
        if self.local_socket is not None and (sharding := await self._shards())[0] > 1:  # each on its shard's socket
            args = (self.local_socket, request.batch_ids, sharding, self._metadata, timeout or self.timeout)
            try:
                async with contextlib.aclosing(pull_shards_async(*args)) as pulled:
                    async for msg in pulled:
                        if self._pushed.accept(msg.batch_id, msg.index):
                            yield ImageResult.from_proto(msg)
            except InferError as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:  # the server may have come back otherwise divided
                    self._shard_count = None
                raise
            return
        call = self._stub.PullResult(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            async for msg in call:
                if self._pushed.accept(msg.batch_id, msg.index):
                    yield ImageResult.from_proto(msg)
        except grpc.RpcError as exc:
            raise InferError.from_rpc(exc) from None
        finally:
            call.cancel()

    async def _shards(self) -> tuple[int, int]:
        """The number of shards of the server behind ``local_socket`` and its uid (asked once)."""
        if self._shard_count is None:
            assert self.local_socket is not None
            args = (self.local_socket, self._pushed, self.timeout, self._metadata)
            self._shard_count = await asyncio.to_thread(shard_count, *args)
        return self._shard_count

    @property
    def inline_fallbacks(self) -> int:
        """Pushes sent inline because the shared tmpfs was full (said once in the log)."""
        return self._pushed.files.inline_fallbacks

    def session(self) -> AsyncSession | AsyncRoutedSession:
        """A new ``AsyncSession`` stream (pushes and results on one RPC; on the local socket if the
        client has one, routed among the server's shards); ``await close()`` it."""
        if self.local_socket is not None:
            return AsyncRoutedSession(self.local_socket, self.transport, self._pushed, self.timeout, self._metadata)
        return AsyncSession(self._sessions, self.transport, self._pushed, self.timeout, self._metadata)

    async def detect(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None
    ) -> list[ImageResult]:
        """Push one batch and wait for all its results; ordered by index like ``images``.

        Runs on the client's own session stream (opened on first use, reopened if it broke).
        """
        if self._session is None or self._session.broken:
            self._session = self.session()
        return await self._session.detect(images, names, request_id)

    async def health(self, timeout: float | None = 5.0) -> bool:
        """True when the server reports SERVING."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            raise InferError.from_rpc(exc) from None
        return reply.status == _SERVING

    async def wait_ready(self, timeout: float | None = 60.0) -> None:
        """Wait until the server reports SERVING (health Watch) or raise InferError; a watch that
        fails UNAVAILABLE is started again until ``timeout``, as ``InferClient.wait_ready`` does."""
        waiting, request = ReadyWait(timeout), health_pb2.HealthCheckRequest(service="")
        while True:
            call = self._health.Watch(request, timeout=waiting.left(), wait_for_ready=True)
            failed: grpc.RpcError | None = None
            try:
                async for reply in call:
                    if reply.status == _SERVING:
                        return
            except grpc.RpcError as exc:
                failed = exc
            finally:
                call.cancel()
            if failed is None:
                raise InferError(grpc.StatusCode.UNAVAILABLE, "health stream ended before the server was ready")
            await asyncio.sleep(waiting.pause_after(failed))

    async def close(self) -> None:
        """End the session, remove the tmpfs files this client still owns and close the channel."""
        if self._session is not None:
            await self._session.close()
        self._pushed.remove_all()
        await self._channel.close()

    async def __aenter__(self) -> AsyncInferClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
