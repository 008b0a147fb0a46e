"""Sessions: pushes and results on one ``Session`` stream, the client's fast path.

Used by ``InferClient.detect``/``session()`` (``Session``: a reader thread; ``local.LocalSession``
on the server's local socket shares ``BlockingSession`` with it) and by
``AsyncInferClient.detect``/``session()`` (``AsyncSession``: a reader task), in the client
application's process. Against ``push`` + ``pull`` a session saves two RPCs per batch and sends
a burst of results per message instead of one message per image; on a busy same-host data path
that is most of the client's and the server's per-image CPU (docs/grpc-front.md).

One ``SessionBook`` per stream keeps what the stream owes its callers: the answer to each push
(by tag) and the results of each accepted batch until they are read. The reader is the only one
that absorbs replies; callers wait on the book. A batch's tmpfs file is registered with the
client's ``PushedBatches`` when its answer arrives, before any of its results can, so the file is
deleted exactly when its last result is in. Results stay buffered here until ``results()`` reads
them: a session that pushes must also read.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
from google.protobuf.message import DecodeError

from infer_client._batch_files import BatchFiles
from infer_client._protocol import ImageSource, InferError, PreparedPush, PushedBatches, prepare_push
from infer_client.results import ImageResult, read_reply, status_code
from infer_proto import infer_pb2

T = TypeVar("T")
Metadata = tuple[tuple[str, str], ...] | None
_ENDED = "the session stream ended"


class SessionBook:
    """Answers by tag and results by batch for one stream (not thread-safe: the owner locks)."""

    def __init__(self, pushed: PushedBatches) -> None:
        self._pushed = pushed
        self._tags = itertools.count(1)
        self._files: dict[int, str | None] = {}  # tag -> its tmpfs file, until answered
        self._answers: dict[int, infer_pb2.PushAnswer] = {}
        self._results: dict[str, collections.deque[ImageResult]] = {}  # accepted, not complete
        self._complete: set[str] = set()  # complete batches whose results were not all read yet
        self.error: InferError | None = None

    def request(self, prepared: PreparedPush, defer_answer: bool) -> tuple[int, infer_pb2.SessionRequest]:
        tag = next(self._tags)
        self._files[tag] = prepared.owned_path
        return tag, infer_pb2.SessionRequest(tag=tag, push=prepared.request, defer_answer=defer_answer)

    def absorb(self, reply: infer_pb2.SessionReply, results: list[ImageResult]) -> None:
        """Answers, then results (``reply``'s, as records: ``read_reply``), then completions: the
        order the server guarantees."""
        for answer in reply.answers:
            path = self._files.pop(answer.tag, None)
            if answer.status.code == 0:
                self._pushed.add(answer.batch_id, path, answer.image_count)
                self._results.setdefault(answer.batch_id, collections.deque())
            else:
                self._pushed.files.discard(path)
            self._answers[answer.tag] = answer
        buffers = self._results
        for result in self._pushed.accept_all([r for r in results if r.batch_id in buffers]):
            buffers[result.batch_id].append(result)
        self._complete.update(b for b in reply.completed if b in self._results)

    def answer(self, tag: int) -> infer_pb2.PushAnswer | None:
        return self._answers.pop(tag, None)

    def take(self, batch_id: str) -> tuple[list[ImageResult], bool] | None:
        """(results arrived since the last take, whether the batch is complete), or None."""
        buffered = self._results[batch_id]
        last = batch_id in self._complete
        if not buffered and not last:
            return None
        taken = list(buffered)
        buffered.clear()
        if last:
            del self._results[batch_id]
            self._complete.discard(batch_id)
        return taken, last

    def owes(self, batch_id: str | None = None) -> bool:
        """Whether results of ``batch_id`` (or of any batch) may still be read here."""
        return batch_id in self._results if batch_id is not None else bool(self._results)

    def fail(self, error: InferError) -> None:
        """The stream ended: every wait from now on raises ``error``; unanswered files go."""
        if self.error is None:
            self.error = error
        for path in self._files.values():
            self._pushed.files.discard(path)
        self._files.clear()


def _accepted(answer: infer_pb2.PushAnswer) -> str:
    if answer.status.code != 0:
        raise InferError(status_code(answer.status.code), answer.status.message)
    return answer.batch_id


def _whole(batch_id: str, results: list[ImageResult], count: int) -> list[ImageResult]:
    """``detect``'s answer: every image's result, by index, or an error, never a short list (a push
    repeated with its request_id gets only what earlier streams did not deliver)."""
    if len(results) != count:
        raise InferError(
            grpc.StatusCode.DATA_LOSS,
            f"{count - len(results)} of {count} results of batch {batch_id} went to an earlier stream; "
            "pull them with PullResult if they were not received, or push again without the request_id",
        )
    return sorted(results, key=lambda r: r.index)


def _not_ours(batch_id: str) -> ValueError:
    return ValueError(f"batch {batch_id!r} was not pushed on this session (or its results were read)")


class BlockingSession:
    """What the two blocking session kinds share (``Session`` on gRPC, ``local.LocalSession`` on the
    server's local socket): reading a batch's results from the book, ``detect``, ``with``. A
    subclass has ``_cond`` (guarding ``_book``), ``_timeout``, ``push``, ``close`` and ``_wait``."""

    _cond: threading.Condition
    _book: SessionBook
    _timeout: float | None
    _transport: str
    _files: BatchFiles

    def push(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None,
        *, defer_answer: bool = False,
    ) -> str:  # fmt: skip
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        raise NotImplementedError

    def _wait(self, ready: Callable[[], T | None], timeout: float | None) -> T:
        """``ready()``'s value once it has one (under the lock), or the book's error, or DEADLINE_EXCEEDED."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (value := ready()) is None:
                if self._book.error is not None:
                    raise self._book.error
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g}s")
                self._until_news(left)
            return value

    def _until_news(self, left: float | None) -> None:
        """Under the lock: return once the book may have changed (or ``left`` seconds passed)."""
        raise NotImplementedError

    @property
    def broken(self) -> bool:
        with self._cond:
            return self._book.error is not None

    def owes(self, batch_id: str | None = None) -> bool:
        """Whether results of ``batch_id`` (or of any batch) may still be read on this session."""
        with self._cond:
            return self._book.owes(batch_id)

    def _booked(
        self, images: Sequence[ImageSource], names: Sequence[str] | None, request_id: str | None,
        defer_answer: bool, embed: bool = True,
    ) -> tuple[int, infer_pb2.SessionRequest, list[bytes] | None]:  # fmt: skip
        """A push's request, written (its batch file) and booked under a new tag; the inline images
        not in it (``prepare_push``'s ``embed=False``)."""
        prepared = prepare_push(images, names, request_id, self._transport, self._files, embed)
        with self._cond:
            if self._book.error is not None:
                self._files.discard(prepared.owned_path)
                raise self._book.error
            return *self._book.request(prepared, defer_answer), prepared.blobs

    def results(self, batch_id: str, timeout: float | None = None) -> Iterator[ImageResult]:
        """The batch's results in completion order as they arrive; ends after its last one."""
        with self._cond:
            if not self._book.owes(batch_id):
                raise _not_ours(batch_id)
        last = False
        while not last:
            taken, last = self._wait(lambda: self._book.take(batch_id), timeout or self._timeout)
            yield from taken

    def detect(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None
    ) -> list[ImageResult]:
        """Push one batch and wait for all its results; ordered by index like ``images``."""
        batch_id = self.push(images, names, request_id, defer_answer=True)
        return _whole(batch_id, list(self.results(batch_id)), len(images))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Session(BlockingSession):
    """One ``Session`` stream of a blocking client; threads may share it. Close it (or ``with``).

    ``push`` returns a batch id once the server admitted the batch (``InferError`` otherwise);
    ``results`` yields that batch's results as they arrive. With ``defer_answer=True`` the server
    sends the answer together with the batch's first results, one message fewer per batch: ``push``
    then returns when those arrived (a refusal still comes at once). For a caller that reads the
    results right after, as ``detect`` does. ``InferClient.detect`` uses a session of its own;
    open more with ``InferClient.session()``.
    """

    def __init__(
        self, stub: Any, transport: str, pushed: PushedBatches, timeout: float | None, metadata: Metadata = None
    ) -> None:
        self._transport, self._files, self._timeout = transport, pushed.files, timeout
        self._cond = threading.Condition()
        self._book = SessionBook(pushed)
        self._requests: queue.SimpleQueue[infer_pb2.SessionRequest | None] = queue.SimpleQueue()
        self._call = stub.Session(iter(self._requests.get, None), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="infer-session-reader", daemon=True)
        self._reader.start()

    def push(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None,
        *, defer_answer: bool = False,
    ) -> str:  # fmt: skip
        """Hand over a batch (paths or encoded bytes); returns its batch id once admitted."""
        tag, request, _ = self._booked(images, names, request_id, defer_answer)
        self._requests.put(request)
        return _accepted(self._wait(lambda: self._book.answer(tag), self._timeout))

    def cancel(self) -> None:
        """Abandon the stream now: waiters get CANCELLED; results it did not receive stay their
        batches', for ``pull`` or a push repeated with its request_id."""
        self._call.cancel()

    def close(self, timeout: float = 5.0) -> None:
        """Stop pushing; wait (bounded) for results still owed, then end the stream."""
        self._requests.put(None)
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
            self._reader.join(timeout)

    def _until_news(self, left: float | None) -> None:
        self._cond.wait(left)  # the reader thread notifies

    def _read(self) -> None:
        error = InferError(grpc.StatusCode.CANCELLED, _ENDED)
        try:
            for payload in self._call:  # each reply's bytes (the stub's Session has no deserializer)
                reply, results = read_reply(payload)
                with self._cond:
                    self._book.absorb(reply, results)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            error = InferError.from_rpc(exc)
        except BaseException as exc:  # a bug, an OS error, a reply that does not parse: fail the waiters
            error = InferError(grpc.StatusCode.INTERNAL, f"session reader failed: {exc!r}")
            self._call.cancel()
            raise
        finally:
            with self._cond:
                self._book.fail(error)
                self._cond.notify_all()


class AsyncSession:
    """One ``Session`` stream of an asyncio client (``AsyncInferClient.session()``); same surface."""

    def __init__(
        self, stub: Any, transport: str, pushed: PushedBatches, timeout: float | None, metadata: Metadata = None
    ) -> None:
        self._transport, self._files, self._timeout = transport, pushed.files, timeout
        self._changed = asyncio.Event()  # set on every reply: waiters re-check the book
        self._writing = asyncio.Lock()
        self._book = SessionBook(pushed)
        self._shards: infer_pb2.Shards | None = None  # a local socket's first reply says
        self._call = stub.Session(metadata=metadata)
        self._reader = asyncio.ensure_future(self._read())

    @property
    def broken(self) -> bool:
        return self._book.error is not None

    async def push(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None,
        *, defer_answer: bool = False,
    ) -> str:  # fmt: skip
        """Hand over a batch (paths or encoded bytes); returns its batch id once admitted."""
        prepared = await asyncio.to_thread(prepare_push, images, names, request_id, self._transport, self._files)
        if self._book.error is not None:
            self._files.discard(prepared.owned_path)
            raise self._book.error
        tag, request = self._book.request(prepared, defer_answer)
        try:
            async with self._writing:  # grpc.aio takes one write at a time
                await self._call.write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            self._book.fail(InferError.from_rpc(exc) if isinstance(exc, grpc.RpcError) else self._ended())
            raise self._book.error from None  # type: ignore[misc]
        return _accepted(await self._wait(lambda: self._book.answer(tag), self._timeout))

    async def results(self, batch_id: str, timeout: float | None = None) -> AsyncIterator[ImageResult]:
        """The batch's results in completion order as they arrive; ends after its last one."""
        if not self._book.owes(batch_id):
            raise _not_ours(batch_id)
        last = False
        while not last:
            taken, last = await self._wait(lambda: self._book.take(batch_id), timeout or self._timeout)
            for result in taken:
                yield result

    async def detect(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None
    ) -> list[ImageResult]:
        """Push one batch and wait for all its results; ordered by index like ``images``."""
        batch_id = await self.push(images, names, request_id, defer_answer=True)
        return _whole(batch_id, [r async for r in self.results(batch_id)], len(images))

    async def shards(self) -> infer_pb2.Shards:
        """How the server is divided (``--shards``): the first thing it says on the local socket."""
        return await self._wait(lambda: self._shards, self._timeout)

    def owes(self, batch_id: str | None = None) -> bool:
        """Whether results of ``batch_id`` (or of any batch) may still be read on this session."""
        return self._book.owes(batch_id)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop pushing; wait (bounded) for results still owed, then end the stream."""
        if not self._reader.done():
            async with self._writing:  # not in the middle of a push's write
                with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
                    await self._call.done_writing()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except TimeoutError:
            self._call.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    async def _wait(self, ready: Callable[[], T | None], timeout: float | None) -> T:
        async def until() -> T:
            while (value := ready()) is None:
                if self._book.error is not None:
                    raise self._book.error
                self._changed.clear()  # no await since the check: no reply can slip in between
                await self._changed.wait()
            return value

        try:
            return await asyncio.wait_for(until(), timeout)
        except TimeoutError:
            raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g}s") from None

    async def _read(self) -> None:
        error = self._ended()
        try:
            async for payload in self._call:  # each reply's bytes, as Session._read's
                reply, results = read_reply(payload)
                if reply.HasField("shards"):
                    self._shards = reply.shards
                self._book.absorb(reply, results)
                self._changed.set()
        except grpc.RpcError as exc:
            error = InferError.from_rpc(exc)
        except DecodeError as exc:  # a reply that does not parse: nothing after it can be trusted
            error = InferError(grpc.StatusCode.INTERNAL, f"a malformed reply on the session: {exc}")
            self._call.cancel()
        finally:  # also when the call (close) or this task is cancelled
            self._book.fail(error)
            self._changed.set()

    @staticmethod
    def _ended() -> InferError:
        return InferError(grpc.StatusCode.CANCELLED, _ENDED)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


__all__ = ["AsyncSession", "BlockingSession", "Session", "SessionBook"]
