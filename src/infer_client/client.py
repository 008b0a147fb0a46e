"""The blocking client: ``push``/``pull`` mirror the RPCs, ``detect`` does both for one batch.

Used by client applications (threads welcome: one client may be shared) and by ``infer-client``.
Requests are built by ``_protocol`` (shared with the asyncio client in ``aio.py``). Example::

    with InferClient("localhost:8001") as client:
        client.wait_ready(timeout=30)
        for result in client.detect(["a.jpg", "b.jpg"]):
            print(result.name, [(d.label, d.attributes["color"].label) for d in result.detections])
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from types import TracebackType

import grpc
import grpc.experimental
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
from infer_client.local import LocalSession
from infer_client.local_pull import pull_shards, push_on_shard, shard_count
from infer_client.models import ModelAdmin
from infer_client.results import ImageResult
from infer_client.routed import RoutedSession, local_session
from infer_client.session import Session
from infer_proto import infer_pb2_grpc

_SERVING = health_pb2.HealthCheckResponse.SERVING
# Server-streaming calls (PullResult, health Watch) are read by the calling thread itself instead of
# a channel "spin" thread that gRPC would otherwise start for every call and hand each message over
# from: a third less client CPU per result (docs/grpc-front.md). The iterators are only ever
# consumed by the thread that made the call, which is what the option requires.
_SYNC_OPTIONS = [*CHANNEL_OPTIONS, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]


class InferClient:
    """Blocking client for ``infer.v1.InferenceService``; close it (or use ``with``)."""

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
        without gRPC (``infer_client.local``), at less than half the CPU per call; the other calls go to
        ``target``."""
        self.target = target
        self.local_socket = local_socket
        self.shm_dir = os.fspath(shm_dir)
        self.transport = resolve_transport(transport, target, self.shm_dir)
        self.timeout = timeout
        self.credentials = credentials or Credentials()
        self._metadata = self.credentials.metadata
        self._channel = open_channel(target, _SYNC_OPTIONS, self.credentials)
        self._stub = infer_pb2_grpc.InferenceServiceStub(self._channel)
        self._sessions = session_stub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self.models = ModelAdmin(self._channel, self._metadata, timeout)  # which models serve, and changing them
        self._pushed = PushedBatches(BatchFiles(self.shm_dir))
        self._session: Session | LocalSession | RoutedSession | None = None
        self._shard_count: tuple[int, int] | None = None  # of the server behind local_socket, once asked
        self._session_lock = threading.Lock()

    def push(
        self,
        images: Sequence[ImageSource],
        names: Sequence[str] | None = None,
        request_id: str | None = None,
    ) -> str:
        """Hand over a batch (paths or encoded bytes); returns its batch id at once.

        With a ``request_id`` and a local socket to a server of several shards, the push goes to
        the id's shard on its socket, as a session's would (``local_pull.push_on_shard``)."""
        prepared = prepare_push(images, names, request_id, self.transport, self._pushed.files)
        try:
            if request_id and self.local_socket is not None and (sharding := self._shards())[0] > 1:
                batch_id = push_on_shard(self.local_socket, prepared.request, sharding, self._metadata, self.timeout)
            else:
                batch_id = self._stub.PushData(prepared.request, timeout=self.timeout, metadata=self._metadata).batch_id
        except grpc.RpcError as exc:
            self._pushed.files.discard(prepared.owned_path)
            raise InferError.from_rpc(exc) from None
        except InferError:
            self._pushed.files.discard(prepared.owned_path)
            raise
        self._pushed.add(batch_id, prepared.owned_path, len(images))
        return batch_id

    def pull(self, batch_ids: str | Sequence[str], timeout: float | None = None) -> Iterator[ImageResult]:
        """Results of the batches in completion order; ends when every image was answered.

        Results the server sent but this iterator did not yield yet (you stopped early) are gone;
        results the server had not sent yet stay available to a later ``pull``.
        """
        request = pull_request(batch_ids)
        if self.local_socket is not None and (sharding := self._shards())[0] > 1:  # each batch on its shard's socket
            args = (self.local_socket, request.batch_ids, sharding, self._metadata, timeout or self.timeout)
            pulled = pull_shards(*args)
            try:
                yield from (ImageResult.from_proto(m) for m in pulled if self._pushed.accept(m.batch_id, m.index))
            except InferError as exc:
                if exc.code == grpc.StatusCode.UNAVAILABLE:  # the server may have come back otherwise divided
                    self._shard_count = None
                raise
            finally:
                pulled.close()
            return
        call = self._stub.PullResult(request, timeout=timeout or self.timeout, metadata=self._metadata)
        try:
            for msg in call:
                if self._pushed.accept(msg.batch_id, msg.index):
                    yield ImageResult.from_proto(msg)
        except grpc.RpcError as exc:
            raise InferError.from_rpc(exc) from None
        finally:
            call.cancel()  # no-op when the stream ended; frees it when the caller stopped early

    def _shards(self) -> tuple[int, int]:
        """The number of shards of the server behind ``local_socket`` and its uid (asked once)."""
        if self._shard_count is None:
            assert self.local_socket is not None
            self._shard_count = shard_count(self.local_socket, self._pushed, self.timeout, self._metadata)
        return self._shard_count

    @property
    def inline_fallbacks(self) -> int:
        """Pushes sent inline because the shared tmpfs was full (said once in the log)."""
        return self._pushed.files.inline_fallbacks

    def session(self) -> Session | LocalSession | RoutedSession:
        """A new ``Session`` stream (pushes and results on one RPC; on the local socket if the client
        has one); close it, or use ``with``."""
        if self.local_socket is not None:
            session = local_session(self.local_socket, self.transport, self._pushed, self.timeout, self._metadata)
            count = session.count if isinstance(session, RoutedSession) else 1
            self._shard_count = count, session.server_uid  # what pull and push ask
            return session
        return Session(self._sessions, self.transport, self._pushed, self.timeout, self._metadata)

    def detect(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None
    ) -> list[ImageResult]:
        """Push one batch and wait for all its results; ordered by index like ``images``.

        Runs on the client's own session stream (opened on first use, reopened if it broke).
        """
        with self._session_lock:
            if self._session is None or self._session.broken:
                self._session = self.session()
            session = self._session
        return session.detect(images, names, request_id)

    def health(self, timeout: float | None = 5.0) -> bool:
        """True when the server reports SERVING (every stage worker ready, not draining)."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            raise InferError.from_rpc(exc) from None
        return reply.status == _SERVING

    def wait_ready(self, timeout: float | None = 60.0) -> None:
        """Block until the server reports SERVING (health Watch, no polling) or raise InferError.

        A watch that fails UNAVAILABLE (its connection died: the server, or a front process of it,
        restarting) is started again until ``timeout`` (None: for good; ``_protocol.ReadyWait``).
        """
        waiting, request = ReadyWait(timeout), health_pb2.HealthCheckRequest(service="")
        while True:
            stream = self._health.Watch(request, timeout=waiting.left(), wait_for_ready=True)
            failed: grpc.RpcError | None = None
            try:
                if any(reply.status == _SERVING for reply in stream):
                    return
            except grpc.RpcError as exc:
                failed = exc
            finally:
                stream.cancel()
            if failed is None:
                raise InferError(grpc.StatusCode.UNAVAILABLE, "health stream ended before the server was ready")
            time.sleep(waiting.pause_after(failed))

    def close(self) -> None:
        """End the session, remove the tmpfs files this client still owns and close the channel."""
        if self._session is not None:
            self._session.close()
        self._pushed.remove_all()
        self._channel.close()

    def __enter__(self) -> InferClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
