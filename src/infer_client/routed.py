"""Sessions on the local socket of a server of several shards (``infer-server serve --shards K``).

Such a server is K data planes, each with its own local socket (``<path>``, ``<path>.1`` …) and its
own batches (``infer_proto.shards``). ``local_session`` connects to ``<path>``, whose first reply
says how many shards there are and which one this client should use (shard 0 spreads its clients
in turn); with one shard that first session is the answer. With several, ``RoutedSession`` keeps
one ``LocalSession`` per shard, opened when first needed:

* a push without a request id goes to the suggested shard, one with a request id to the shard
  the id belongs to, so that a repeated push finds the first one wherever it is sent from;
* a batch's results are read on the session that pushed it.

It has ``LocalSession``'s surface and guarantees; threads may share it. ``AsyncRoutedSession`` is
the same for ``AsyncInferClient``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Self

import grpc

from infer_client._protocol import ImageSource, InferError, PushedBatches
from infer_client.local import LocalSession
from infer_client.local_async import AsyncLocalStub
from infer_client.results import ImageResult
from infer_client.session import AsyncSession, Metadata, _not_ours, _whole
from infer_proto import infer_pb2
from infer_proto.shards import request_shard, shard_socket


def local_session(
    path: str | os.PathLike[str], transport: str, pushed: PushedBatches, timeout: float | None, metadata: Metadata
) -> LocalSession | RoutedSession:
    """A session on the server's local socket ``path``: routed among its shards if it has several."""
    first = LocalSession(path, transport, pushed, timeout, metadata)
    try:
        shards = first.shards()
    except InferError:
        first.cancel()
        raise
    if shards.count <= 1:
        return first
    return RoutedSession(path, transport, pushed, timeout, metadata, shards, first)


class RoutedSession:
    """A session over every shard of one server (see the module); close it (or ``with``)."""

    def __init__(
        self, path: str | os.PathLike[str], transport: str, pushed: PushedBatches, timeout: float | None,
        metadata: Metadata, shards: infer_pb2.Shards, first: LocalSession,
    ) -> None:  # fmt: skip
        uid = self.server_uid = first.server_uid  # every shard's socket must be served by shard 0's user
        self._open = lambda shard: LocalSession(shard_socket(path, shard), transport, pushed, timeout, metadata, uid)
        self.count, self.home = shards.count, shards.suggested
        self._lock = threading.Lock()
        self._current = {shards.index: first}  # by shard: the session new pushes go to
        self._sessions = [first]  # every session opened: a broken one may still hold results
        self._closed = self._unreachable = False

    def _session(self, shard: int) -> LocalSession:
        """The shard's session: opened (again, if its last one broke) when needed."""
        with self._lock:
            if self._closed:
                raise InferError(grpc.StatusCode.CANCELLED, "the session is closed")
            session = self._current.get(shard)
            if session is None or session.broken:
                # A broken session is kept only while it holds results not read yet.
                self._sessions = [s for s in self._sessions if not s.broken or s.owes()]
                try:
                    session = self._current[shard] = self._open(shard)
                except InferError:  # the server may have come back otherwise divided: ask it again
                    self._unreachable = True
                    raise
                self._sessions.append(session)
            return session

    def push(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None,
        *, defer_answer: bool = False,
    ) -> str:  # fmt: skip
        """Hand over a batch (paths or encoded bytes) to its shard; returns its batch id once admitted."""
        shard = request_shard(request_id, self.count) if request_id else self.home
        return self._session(shard).push(images, names, request_id, defer_answer=defer_answer)

    def results(self, batch_id: str, timeout: float | None = None) -> Iterator[ImageResult]:
        """The batch's results in completion order as they arrive; ends after its last one."""
        with self._lock:
            session = next((s for s in self._sessions if s.owes(batch_id)), None)
        if session is None:
            raise _not_ours(batch_id)
        return session.results(batch_id, timeout)

    def detect(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None
    ) -> list[ImageResult]:
        """Push one batch and wait for all its results; ordered by index like ``images``."""
        batch_id = self.push(images, names, request_id, defer_answer=True)
        return _whole(batch_id, list(self.results(batch_id)), len(images))

    @property
    def broken(self) -> bool:
        """Closed, or a shard's socket could not be reached (the shards may have changed: a new
        session asks). A shard's session that fails is opened again by the next push needing it."""
        return self._closed or self._unreachable

    def cancel(self) -> None:
        """Abandon every shard's call now (see ``LocalSession.cancel``)."""
        for session in self._close():
            session.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Stop pushing; wait (bounded, for each shard's session) for results still owed, then end."""
        for session in self._close():
            session.close(timeout)

    def _close(self) -> list[LocalSession]:
        with self._lock:
            self._closed = True
            return list(self._sessions)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncRoutedSession:
    """``RoutedSession`` for asyncio (``AsyncInferClient.session()`` on a local socket): made at
    once, it learns the shards from its first session's first reply when its first push needs to
    know. With one shard every push goes to that session."""

    def __init__(
        self, path: str | os.PathLike[str], transport: str, pushed: PushedBatches, timeout: float | None,
        metadata: Metadata,
    ) -> None:  # fmt: skip
        self._zero = AsyncLocalStub(path)  # its first call's server: the uid every shard's must have
        self._open = lambda shard: AsyncSession(
            self._zero if shard == 0 else AsyncLocalStub(shard_socket(path, shard), self._zero.server_uid),
            transport, pushed, timeout, metadata,
        )  # fmt: skip
        first = self._open(0)
        self._first: AsyncSession | None = first  # until the shards are known
        self._shards = infer_pb2.Shards(count=1)
        self._current = {0: first}
        self._sessions = [first]
        self._closed = self._unreachable = False

    async def _session(self, request_id: str | None) -> AsyncSession:
        if (first := self._first) is not None:  # the first push: ask (a failed answer leaves it to the next)
            if first.broken:  # it ended before it said: ask on a new one
                first = self._first = self._current[0] = self._open(0)
                self._sessions.append(first)
            shards = await first.shards()
            if self._first is first:  # not taken in by a push that asked at the same time
                self._shards, self._current, self._first = shards, {shards.index: first}, None
        count = self._shards.count
        shard = request_shard(request_id, count) if request_id else self._shards.suggested
        if self._closed:
            raise InferError(grpc.StatusCode.CANCELLED, "the session is closed")
        session = self._current.get(shard)
        if session is None or session.broken:
            self._sessions = [s for s in self._sessions if not s.broken or s.owes()]
            session = self._current[shard] = self._open(shard)
            self._sessions.append(session)
        return session

    @property
    def home(self) -> int:
        """The shard pushes without a request id go to (known after the first push)."""
        return self._shards.suggested

    @property
    def broken(self) -> bool:
        """Closed, or a shard was unreachable (see ``RoutedSession.broken``)."""
        return self._closed or self._unreachable

    async def push(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None,
        *, defer_answer: bool = False,
    ) -> str:  # fmt: skip
        """Hand over a batch (paths or encoded bytes) to its shard; returns its batch id once admitted."""
        try:
            session = await self._session(request_id)
            return await session.push(images, names, request_id, defer_answer=defer_answer)
        except InferError as exc:
            self._unreachable = self._unreachable or exc.code == grpc.StatusCode.UNAVAILABLE
            raise

    async def results(self, batch_id: str, timeout: float | None = None) -> AsyncIterator[ImageResult]:
        """The batch's results in completion order as they arrive; ends after its last one."""
        session = next((s for s in self._sessions if s.owes(batch_id)), None)
        if session is None:
            raise _not_ours(batch_id)
        async for result in session.results(batch_id, timeout):
            yield result

    async def detect(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None
    ) -> list[ImageResult]:
        """Push one batch and wait for all its results; ordered by index like ``images``."""
        batch_id = await self.push(images, names, request_id, defer_answer=True)
        return _whole(batch_id, [r async for r in self.results(batch_id)], len(images))

    async def close(self, timeout: float = 5.0) -> None:
        """Stop pushing; wait (bounded, each shard's session at once) for results owed, then end."""
        self._closed = True
        await asyncio.gather(*(session.close(timeout) for session in self._sessions))

    async def __aenter__(self) -> AsyncRoutedSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
