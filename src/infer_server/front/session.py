"""The Session protocol: pushes in, their answers and every result of the pushed batches out.

One ``SessionProtocol`` runs one bidirectional Session stream on the event loop. It knows the
stream only as ``read()`` / ``write()`` (grpc.aio's servicer context, or any object with those two
coroutines), the server only as ``push`` (validate and admit one ``PushDataRequest``, returning its
``Batch`` or raising what PushData would fail with) and its batches through a ``SessionCursor``, so
it runs, and is tested, without a network or a worker.

Flow. A reader task validates and admits each push as it comes, in order, and queues its
``PushAnswer`` — admitted, or refused in-band with the status PushData would have failed with; the
stream goes on. The writer (``run``) sends whatever is ready in one ``SessionReply``: answers first,
so a batch's answer precedes its results, then up to ``MAX_RESULTS_PER_REPLY`` results and the ids
of batches now complete. A push that asked for ``defer_answer`` has its answer held back until its
batch's first results or its completion, saving a message. The stream ends once the client
half-closed and every accepted batch was delivered and reported complete.

Bounds. At most ``MAX_PENDING_ANSWERS`` answers may be owed before the reader stops reading pushes
(a client that pushes but never reads is then held by gRPC flow control), and results already handed
out are put back if a write fails (``Cursor.nack``): nothing is lost when a stream breaks.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import grpc
import grpc.aio

from infer_proto import infer_pb2
from infer_server._wire import image_results
from infer_server.front.batches import Batch
from infer_server.front.cursors import Cursor, SessionCursor
from infer_server.front.errors import Unavailable, Unreadable, status_for
from infer_server.messages import ImageOutcome

# Answers a Session may owe its client before it stops reading pushes (flow control holds the rest).
MAX_PENDING_ANSWERS = 256
# Results per SessionReply: keeps a reply far below any message limit (a result with 100 detections
# and a long name is ~10 KB); a backlog goes out in several replies.
MAX_RESULTS_PER_REPLY = 256


# SessionReply.results: a reply is written as bytes, its results encoded by ``image_results`` (C)
# straight from the records and appended to the rest, which protobuf serializes.
_RESULTS_FIELD = infer_pb2.SessionReply.DESCRIPTOR.fields_by_name["results"].number


def reply_bytes(reply: bytes) -> bytes:
    """The Session method's response serializer: ``SessionProtocol`` writes serialized replies."""
    return reply


class Stream(Protocol):
    """The two calls of a bidirectional stream the protocol uses (``grpc.aio.ServicerContext``);
    ``write`` takes a serialized ``SessionReply`` (the method serializes with ``reply_bytes``)."""

    async def read(self) -> Any: ...

    async def write(self, message: Any) -> None: ...


def outcome_to_proto(
    outcome: ImageOutcome, make: Callable[[], infer_pb2.ImageResult] = infer_pb2.ImageResult
) -> infer_pb2.ImageResult:
    """The wire form of one image's terminal record (worker codes are gRPC codes already).

    ``make`` builds the message: ``ImageResult`` by default, or a reply's ``results.add``, which
    builds it in place instead of copying it into the reply. Fields are set one by one, those at
    their default not at all: keyword arguments cost a dictionary and a lookup per field.
    """
    result = make()
    result.batch_id = outcome.batch_id
    if outcome.index:
        result.index = outcome.index
    if outcome.name:
        result.name = outcome.name
    result.width, result.height, result.worker = outcome.width, outcome.height, outcome.worker
    if outcome.cached:
        result.cached = True
    status = result.status
    status.code = int(outcome.code)  # sets status even when OK, as it always was
    if outcome.message:
        status.message = outcome.message
    timings = result.timings_ms
    for stage, ms in outcome.timings_ms:  # a map's update() is a Python loop of its own, slower
        timings[stage] = ms
    if outcome.models:
        result.model_versions.update(outcome.models)
    for d in outcome.detections:
        result.detections.add(
            class_id=d.class_id,
            label=d.label,
            score=d.score,
            box=infer_pb2.Box(x1=d.box.x1, y1=d.box.y1, x2=d.box.x2, y2=d.box.y2),
            attributes=[infer_pb2.Attribute(model=a.model, label=a.label, score=a.score) for a in d.attributes],
        )
    return result


async def write_outcomes(stream: Stream, cursor: Cursor, outcomes: list[ImageOutcome], message: Any) -> None:
    """Write ``message`` carrying ``outcomes``: acked once written; put back if the write fails or the
    stream is cancelled (even if the bytes may have reached the client: a repeat beats a loss)."""
    try:
        await stream.write(message)
    except BaseException:
        cursor.nack(outcomes)
        raise
    cursor.ack(outcomes)


class SessionProtocol:
    """One Session stream: ``await SessionProtocol(stream, push, cursor).run()``, made on the loop."""

    def __init__(
        self, stream: Stream, push: Callable[[infer_pb2.PushDataRequest], Awaitable[Batch]], cursor: SessionCursor,
        idle_timeout_s: float | None = None,
    ) -> None:  # fmt: skip
        self._stream, self._push, self._cursor = stream, push, cursor
        self._idle_timeout_s = idle_timeout_s
        self._pushing = False  # the reader is admitting a push: an answer is on its way
        self._answers: list[infer_pb2.PushAnswer] = []  # ready to go out with the next reply
        self._deferred: dict[str, list[infer_pb2.PushAnswer]] = {}  # by batch id, until it has results
        self._owed = 0  # answers queued or deferred, not written yet
        self._room = asyncio.Event()  # answers were written: a reader held back by the bound goes on
        self._idle_since: float | None = None  # loop time the writer began waiting with nothing owed
        self._idle_timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._cut = False  # the last reply took as many results as one may hold: more may be ready
        self._loop = asyncio.get_running_loop()

    async def run(self) -> None:
        """Serve the stream until the client half-closed and everything it pushed was delivered."""
        reader = asyncio.ensure_future(self._read_pushes())
        try:
            while True:
                if await self._send_ready() and (self._cursor.woken or self._cut):
                    continue  # more may be ready: the reply was cut at its bound, or something came meanwhile
                if reader.done():
                    reader.result()  # a broken request stream ends this one with its error
                    if self._cursor.finished:
                        return
                await self._wait()
        finally:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader

    async def _wait(self) -> None:
        """Until something may have changed; with nothing owed for ``idle_timeout_s``, end the
        stream (UNAVAILABLE: the client opens a new one when it has work again). One timer per
        stream watches the idle waits (``_check_idle``); a timeout per wait made and cancelled a
        timer, and its context manager, on every push."""
        if not self._idle or self._idle_timeout_s is None:
            await self._cursor.wait()
            return
        self._idle_since = since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_at(since + self._idle_timeout_s, self._check_idle)
        try:
            await self._cursor.wait()
        finally:
            self._idle_since = None
        if self._timed_out:
            self._timed_out = False
            if self._idle:
                raise Unavailable(f"session idle for {self._idle_timeout_s:g} s; open a new one")

    def _check_idle(self) -> None:
        """The idle timer: end the wait that has lasted ``idle_timeout_s``, or wait for the current
        one to; none while the stream is busy (its next idle wait starts the timer again)."""
        self._idle_timer = None
        if self._idle_since is None or self._idle_timeout_s is None:
            return
        due = self._idle_since + self._idle_timeout_s
        if self._loop.time() >= due:
            self._timed_out = True
            self._cursor.poke()
        else:
            self._idle_timer = self._loop.call_at(due, self._check_idle)

    @property
    def _idle(self) -> bool:
        return not (self._owed or self._pushing or self._cursor.holds_batches)

    async def _read_pushes(self) -> None:
        try:
            while (request := await self._stream.read()) is not grpc.aio.EOF:
                defer = request.defer_answer
                self._pushing = True
                try:
                    answer = await self._answer(request, wake=not defer)
                finally:
                    self._pushing = False
                if defer and answer.batch_id:
                    self._deferred.setdefault(answer.batch_id, []).append(answer)
                else:
                    self._answers.append(answer)
                    self._cursor.poke()
                self._owed += 1
                while self._owed >= MAX_PENDING_ANSWERS:  # a client that pushes but never reads
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._cursor.seal()

    async def _answer(self, request: infer_pb2.SessionRequest | Unreadable, wake: bool) -> infer_pb2.PushAnswer:
        """Admit one push (its results now go to this stream) or refuse it in-band."""
        if isinstance(request, Unreadable):  # this push alone fails; the session goes on
            status = infer_pb2.Status(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message=request.reason)
            return infer_pb2.PushAnswer(tag=request.tag, status=status)
        try:
            batch = await self._push(request.push)
        except Exception as exc:
            code, message = status_for(exc, "Session push")
            status = infer_pb2.Status(code=code.value[0], message=message)
            return infer_pb2.PushAnswer(tag=request.tag, status=status)
        self._cursor.add(batch, wake=wake)
        return infer_pb2.PushAnswer(tag=request.tag, batch_id=batch.batch_id, image_count=batch.size)

    async def _send_ready(self) -> bool:
        """Write one reply with whatever is ready; False if nothing was. ``run`` looks again only
        if the cursor was woken meanwhile or the reply was cut at ``MAX_RESULTS_PER_REPLY``."""
        cursor = self._cursor
        cursor.hush()  # whatever changes from here on wakes it again
        outcomes = cursor.take(MAX_RESULTS_PER_REPLY)
        self._cut = len(outcomes) == MAX_RESULTS_PER_REPLY
        completed = cursor.completions(outcomes)
        if self._deferred and (outcomes or completed):
            self._undefer({*(o.batch_id for o in outcomes), *completed})
        if not (self._answers or outcomes or completed):
            return False
        try:
            reply = infer_pb2.SessionReply(answers=self._answers, completed=completed).SerializeToString()
            if outcomes:
                reply += image_results(outcomes, _RESULTS_FIELD)  # the rest of the reply: its results
        except BaseException:
            cursor.nack(outcomes)  # not handed out after all: another stream may take them
            raise
        self._owed -= len(self._answers)
        self._answers.clear()
        await write_outcomes(self._stream, cursor, outcomes, reply)
        cursor.release(completed)
        self._room.set()
        return True

    def _undefer(self, batch_ids: Iterable[str]) -> None:
        for batch_id in batch_ids:
            self._answers.extend(self._deferred.pop(batch_id, ()))
