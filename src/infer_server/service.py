"""The gRPC front: ``InferenceService`` on grpc.aio, plus health, reflection and the server's lifecycle.

Runs in the server's main process, on one asyncio event loop; ``infer_server.cli`` creates an
:class:`InferenceServer` and tests do the same with ``port=0``. Everything a request touches lives
on the loop (``BatchRegistry``) or in a worker thread for filesystem work (``Handoff``); the stage
workers are separate processes owned by ``PipelinePool``, whose outcome and health callbacks arrive
on pool threads and hop onto the loop with ``call_soon_threadsafe``.

Lifecycle: ``start()`` binds the port and serves health NOT_SERVING while the pool spawns its
workers (spawn context, so the gRPC objects already created are never forked) and waits for every
one to load its models; then SERVING. ``stop()`` turns health NOT_SERVING, refuses new batches
(UNAVAILABLE), lets in-flight batches finish within ``drain_timeout_s``, stops the gRPC server
with a grace period for open streams, stops the pool, and removes the server's staging directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infer_proto import infer_pb2, infer_pb2_grpc
from infer_server.batches import Batch, BatchRegistry, Subscription
from infer_server.errors import Unavailable, rpc_boundary, status_for
from infer_server.handoff import BatchFile, BatchPlan, Handoff, HandoffLimits, run_janitor
from infer_server.messages import ImageOutcome
from infer_server.metrics import ServerMetrics
from infer_server.pool import PipelineError, PipelinePool
from infer_server.settings import ServerSettings

log = logging.getLogger(__name__)

SERVICE_NAME = infer_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Answers a Session may owe its client before it stops reading pushes (flow control holds the rest).
MAX_PENDING_ANSWERS = 256
# Results per SessionReply: keeps a reply far below any message limit (a result with 100 detections
# and a long name is ~10 KB); a backlog goes out in several replies.
MAX_RESULTS_PER_REPLY = 256


def outcome_to_proto(
    outcome: ImageOutcome, make: Callable[..., infer_pb2.ImageResult] = infer_pb2.ImageResult
) -> infer_pb2.ImageResult:
    """The wire form of one image's terminal record (worker codes are gRPC codes already).

    ``make`` builds the message: ``ImageResult`` by default, or a reply's ``results.add``, which
    builds it in place instead of copying it into the reply (half the cost, per result, per burst).
    """
    result = make(
        batch_id=outcome.batch_id, index=outcome.index, name=outcome.name, width=outcome.width,
        height=outcome.height, worker=outcome.worker,
    )  # fmt: skip
    result.status.code = int(outcome.code)  # sets status even when OK, as it always was
    if outcome.message:
        result.status.message = outcome.message
    result.timings_ms.update(outcome.timings_ms)
    for d in outcome.detections:
        result.detections.add(
            class_id=d.class_id,
            label=d.label,
            score=d.score,
            box=infer_pb2.Box(x1=d.box.x1, y1=d.box.y1, x2=d.box.x2, y2=d.box.y2),
            attributes=[infer_pb2.Attribute(model=a.model, label=a.label, score=a.score) for a in d.attributes],
        )
    return result


class InferenceServicer(infer_pb2_grpc.InferenceServiceServicer):
    """PushData / PullResult. Errors leave through ``rpc_boundary`` only."""

    def __init__(self, server: InferenceServer) -> None:
        self._server = server

    @rpc_boundary
    async def PushData(
        self, request: infer_pb2.PushDataRequest, context: grpc.aio.ServicerContext
    ) -> infer_pb2.PushDataReply:
        batch = await self._server.push(request)
        return infer_pb2.PushDataReply(batch_id=batch.batch_id, image_count=batch.size)

    @rpc_boundary
    async def PullResult(self, request: infer_pb2.PullResultRequest, context: grpc.aio.ServicerContext) -> None:
        with self._server.registry.subscribe(request.batch_ids) as subscription:
            while (outcome := await subscription.next()) is not None:
                await _write(context, subscription, [outcome], outcome_to_proto(outcome))

    @rpc_boundary
    async def Session(self, requests: Any, context: grpc.aio.ServicerContext) -> None:
        """Pushes in; their answers and every result of the pushed batches out, a burst per message.

        A reader task validates and admits each push as it comes (in order) and queues its answer;
        this coroutine writes whatever is ready (answers first, so a batch's answer precedes its
        results) and ends once the client half-closed and every accepted batch was delivered. An
        accepted push that asked for ``defer_answer`` waits in ``deferred`` and leaves with its
        batch's first results or its completion, saving a message.
        """
        srv = self._server
        answers: list[infer_pb2.PushAnswer] = []
        deferred: dict[str, list[infer_pb2.PushAnswer]] = {}  # by batch id
        held = 0  # answers queued or deferred, not written yet
        room = asyncio.Event()  # answers were written: a reader held back by MAX_PENDING_ANSWERS goes on
        with srv.registry.open_session() as session:

            async def read_pushes() -> None:
                nonlocal held
                try:
                    while (request := await context.read()) is not grpc.aio.EOF:
                        defer = request.defer_answer
                        answer = await srv.answer_push(request, session, wake=not defer)
                        if defer and answer.batch_id:
                            deferred.setdefault(answer.batch_id, []).append(answer)
                        else:
                            answers.append(answer)
                            session.poke()
                        held += 1
                        while held >= MAX_PENDING_ANSWERS:  # a client that pushes but never reads
                            room.clear()
                            await room.wait()
                finally:
                    session.seal()

            def undefer(batch_ids: Iterable[str]) -> None:
                for batch_id in batch_ids:
                    answers.extend(deferred.pop(batch_id, ()))

            reader = asyncio.ensure_future(read_pushes())
            try:
                while True:
                    outcomes = session.take(MAX_RESULTS_PER_REPLY)
                    completed = session.completions(outcomes)
                    if deferred and (outcomes or completed):
                        undefer({*(o.batch_id for o in outcomes), *completed})
                    if answers or outcomes or completed:
                        reply = infer_pb2.SessionReply(answers=answers, completed=completed)
                        for outcome in outcomes:
                            outcome_to_proto(outcome, reply.results.add)
                        held -= len(answers)
                        answers.clear()
                        await _write(context, session, outcomes, reply)
                        session.release(completed)
                        room.set()
                        continue
                    if reader.done():
                        reader.result()  # a broken request stream ends this one with its error
                        if session.finished:
                            return
                    await session.wait()
            finally:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader


async def _write(context: grpc.aio.ServicerContext, subscription: Subscription, outcomes: list[ImageOutcome],
                 message: Any) -> None:  # fmt: skip
    """Write ``message`` carrying ``outcomes``: acked once written; put back if the write fails or the
    stream is cancelled (even if the bytes may have reached the client: a repeat beats a loss)."""
    try:
        await context.write(message)
    except BaseException:
        subscription.nack(outcomes)
        raise
    subscription.ack(outcomes)


class InferenceServer:
    """One server: gRPC front, batch registry, tmpfs handoff and the stage-worker pool."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.handoff = Handoff(
            settings.shm_dir,
            settings.staging,
            HandoffLimits(settings.max_batch_images, settings.max_batch_bytes, settings.max_name_length),
        )
        self.registry = BatchRegistry(
            max_inflight_images=settings.max_inflight_images,
            max_inflight_bytes=settings.max_inflight_bytes,
            result_ttl_s=settings.result_ttl_s,
            on_finished=self._on_finished,
        )
        self.metrics = ServerMetrics(lambda: self.registry.inflight_images)
        self.accepting = False
        self.port = 0
        self.pool: PipelinePool | None = None
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = -1
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = False
        # Outcomes the pool's threads make up (deadline, crash, shutdown) wait here for the loop; one
        # wake-up takes them all.
        self._arrivals: list[ImageOutcome] = []
        self._arrivals_lock = threading.Lock()
        self._flush_scheduled = False

    async def start(self) -> int:
        """Bind, serve NOT_SERVING, start the workers, then SERVING; returns the bound port."""
        s = self.settings
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self.handoff.prepare_dirs()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, _NOT_SERVING)
        limit = s.max_message_bytes
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
            maximum_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        infer_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host
        self.port = server.add_insecure_port(f"{host}:{s.port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {host}:{s.port}")
        self._server = server
        await server.start()
        try:
            self.pool = await self._loop.run_in_executor(None, self._start_pool)
        except BaseException:
            await server.stop(0)
            self.handoff.remove_staging_dir()
            raise
        self.accepting = True
        await self._set_health(True)
        self._spawn(run_janitor(self.handoff, s.janitor_ttl_s, s.janitor_interval_s, self.registry.staged_paths))
        self._spawn(self._housekeeping())
        if s.metrics_port is not None:
            self.metrics.serve(s.metrics_port, s.host)
        if s.null_model:
            log.warning("null model: images are read and header-checked only; results carry no detections")
        log.info("serving on %s:%d with %d workers (%s)", s.host, self.port, s.workers, s.device)
        return self.port

    def _start_pool(self) -> PipelinePool:
        """Blocking (executor thread): spawn the workers and wait until each loaded its models."""
        s = self.settings
        pool = PipelinePool(
            s.models_dir,
            workers=s.workers,
            device=s.device,
            batch_size=s.batch_size,
            max_attempts=s.max_attempts,
            max_image_pixels=s.max_image_pixels,
            intra_op_threads=s.intra_op_threads,
            null_model=s.null_model,
            loop=self._loop,
            on_outcome=self._outcome_from_pool,
            on_health=self._health_from_pool,
        )
        pool.start(timeout=s.startup_timeout_s)
        return pool

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; safe to call twice."""
        if self._stopped or self._server is None:
            return
        self._stopped = True
        s = self.settings
        self.accepting = False
        await self._health.enter_graceful_shutdown()
        if not await self.registry.wait_idle(s.drain_timeout_s):
            log.warning("drain timed out with %d images in flight", self.registry.inflight_images)
        await self._server.stop(s.stop_grace_s if grace is None else grace)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(
                None, functools.partial(self.pool.stop, timeout=10.0, drain=True)
            )
        self.handoff.remove_staging_dir()
        self.metrics.close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def push(self, request: infer_pb2.PushDataRequest) -> Batch:
        """Validate and admit one push (PushData, or one push of a Session); returns its batch."""
        if not self.accepting:
            raise Unavailable("the server is not accepting batches (starting or draining)")
        plan = self.handoff.plan(request.path, request.data, request.sizes, request.names)
        deadline = time.monotonic() + self.settings.batch_deadline_s
        reservation = self.registry.reserve(request.request_id, plan.images, plan.total_bytes, deadline)
        if not reservation.is_new:
            # Shielded: a retry giving up must not cancel the first request's future.
            return await asyncio.shield(reservation.ready)
        batch = reservation.batch
        try:
            file = await self.materialize(plan)
            self.submit(batch, file)
        except BaseException as exc:
            self.registry.abandon(reservation, exc)
            raise
        self.registry.activate(reservation, file)
        self.metrics.batch_accepted(batch.size)
        return batch

    async def answer_push(
        self, request: infer_pb2.SessionRequest, session: Subscription, wake: bool = True
    ) -> infer_pb2.PushAnswer:
        """One push of a Session: admitted (its results now go to ``session``) or refused in-band,
        with the status PushData would have failed with."""
        try:
            batch = await self.push(request.push)
        except Exception as exc:
            code, message = status_for(exc, "Session push")
            status = infer_pb2.Status(code=code.value[0], message=message)
            return infer_pb2.PushAnswer(tag=request.tag, status=status)
        session.add(batch, wake=wake)
        return infer_pb2.PushAnswer(tag=request.tag, batch_id=batch.batch_id, image_count=batch.size)

    async def materialize(self, plan: BatchPlan) -> BatchFile:
        """Validate or stage a batch (in a thread unless it is a client file on a memory file system,
        see ``handoff``); a cancelled push still cleans up its staging copy."""
        if plan.path is not None and self.handoff.in_memory:
            return self.handoff.materialize(plan)
        task = asyncio.ensure_future(asyncio.to_thread(self.handoff.materialize, plan))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(
                lambda t: None if t.cancelled() or t.exception() else self.handoff.release(t.result())
            )
            raise

    def submit(self, batch: Batch, file: BatchFile) -> None:
        """Hand the batch to the pool; a pool that refuses it makes the push UNAVAILABLE."""
        assert self.pool is not None
        try:
            self.pool.submit_batch(
                batch.batch_id, file.path, file.dev, file.ino, file.size, file.images, batch.deadline
            )
        except PipelineError as exc:
            log.warning("pool refused batch %s: %s", batch.batch_id, exc)
            self.handoff.release(file)
            raise Unavailable("the pipeline is not accepting batches; retry later") from None

    def _on_finished(self, batch: Batch) -> None:
        if batch.file is not None and batch.file.staged:
            self._spawn(asyncio.to_thread(self.handoff.release, batch.file))

    def _outcome_from_pool(self, outcome: ImageOutcome) -> None:
        """A worker's outcomes arrive on the loop (the pool reads its workers' pipes there). Those the
        pool makes up in its threads (deadline, crash, shutdown) hop onto the loop, which is woken
        once per burst, not once per image (docs/workers.md)."""
        if threading.get_ident() == self._loop_thread:
            self.metrics.image_done(outcome)
            self.registry.record(outcome)
            return
        with self._arrivals_lock:
            self._arrivals.append(outcome)
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        self._call_on_loop(self._record_arrivals)

    def _record_arrivals(self) -> None:
        with self._arrivals_lock:
            outcomes, self._arrivals = self._arrivals, []
            self._flush_scheduled = False
        for outcome in outcomes:
            self.metrics.image_done(outcome)
            self.registry.record(outcome)

    def _health_from_pool(self, healthy: bool) -> None:
        """Pool thread -> event loop: a worker died (False) or every worker is back (True)."""
        self._call_on_loop(lambda: self._spawn(self._set_health(healthy)))

    def _call_on_loop(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
            loop.call_soon_threadsafe(callback, *args)

    async def _set_health(self, healthy: bool) -> None:
        status = _SERVING if healthy and self.accepting else _NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    async def _housekeeping(self) -> None:
        """Expire finished batches and answer overdue ones, once a second."""
        while True:
            self.registry.expire()
            await asyncio.sleep(1.0)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
