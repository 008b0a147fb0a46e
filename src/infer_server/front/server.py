"""The server's main process: the gRPC front's lifecycle and what every push goes through.

``infer_server.cli`` creates one :class:`InferenceServer` on an asyncio event loop. The RPC
handlers (``front.service``) call ``push``; what a request touches lives on the loop
(``BatchRegistry``) or in a thread for filesystem work (``Handoff``); the stage workers are
processes owned by the supervisor (``PipelinePool``), whose callbacks run on the same loop.

Lifecycle: ``start()`` binds the port and serves health NOT_SERVING while the pool spawns its
workers (spawn context: the gRPC objects are never forked) and waits for each to load its models;
then SERVING. ``stop()`` turns health NOT_SERVING, refuses new batches (UNAVAILABLE), lets batches
in flight finish within ``drain_timeout_s``, stops gRPC with a grace period for open streams, stops
the pool, and removes the server's staging directory.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from infer_proto import infer_pb2
from infer_proto.shards import request_shard
from infer_server.front import audit
from infer_server.front.batches import Batch, BatchRegistry, Quota, request_fingerprint
from infer_server.front.control import ModelControl
from infer_server.front.control_service import CONTROL_SERVICE, ModelControlServicer
from infer_server.front.drift import DriftMonitor
from infer_server.front.errors import InvalidBatch, Refused, ServerError, Unavailable
from infer_server.front.fronts import Front, make_front
from infer_server.front.gate import Gate
from infer_server.front.handoff import BatchFile, Handoff
from infer_server.front.identity import Authenticator, Identity, load_tokens
from infer_server.front.layout import BatchPlan, HandoffLimits, too_long
from infer_server.front.listen import raise_descriptor_limit
from infer_server.front.metrics import ServerMetrics
from infer_server.front.oip import OIP_SERVICE, OpenInferenceServicer
from infer_server.front.regions import Regions
from infer_server.front.relayed import Handlers
from infer_server.front.result_cache import ResultCache
from infer_server.front.service import SERVICE_NAME, InferenceServicer
from infer_server.front.shards import ShardProcesses, shard_settings, staging_dirs
from infer_server.front.upkeep import Upkeep
from infer_server.messages import ImageOutcome, ImageRef
from infer_server.settings import ServerSettings
from infer_server.supervisor.pool import PipelineError, PipelinePool

log = logging.getLogger(__name__)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_INTERNAL = grpc.StatusCode.INTERNAL


class InferenceServer:
    """One server: gRPC front, batch registry, tmpfs handoff and the stage-worker pool."""

    def __init__(self, settings: ServerSettings) -> None:
        """``settings``: the whole server's; a shard (``--shards``) serves its share of them."""
        self._whole = settings
        settings = self.settings = shard_settings(settings)
        limits = HandoffLimits(
            settings.max_batch_images, settings.max_batch_bytes, settings.max_name_bytes, settings.max_path_bytes
        )
        self.handoff = Handoff(
            settings.shm_dir, settings.staging, limits, spill=settings.spill_dir, spill_at=settings.spill_at,
            others=[d for d in staging_dirs(self._whole) if d != settings.staging],
        )  # fmt: skip
        quota = Quota(
            settings.max_inflight_images_per_identity or settings.max_inflight_images,
            settings.max_inflight_bytes_per_identity or settings.max_inflight_bytes,
            settings.max_retained_batches_per_identity,
        )
        self.registry = BatchRegistry(
            max_inflight_images=settings.max_inflight_images,
            max_inflight_bytes=settings.max_inflight_bytes,
            result_ttl_s=settings.result_ttl_s,
            max_retained_batches=settings.max_retained_batches,
            quota=quota,
            on_finished=self._on_finished,
            shard=(settings.shard_index, settings.shards),
        )
        self.authenticator = Authenticator(None, False, settings.owner_uids())
        self.metrics = ServerMetrics(lambda: self.registry.inflight_images)
        self.metrics.watch_staging(self.handoff)
        self.cache: ResultCache | None = None
        if settings.result_cache_entries:
            mib, k = settings.result_cache_mib, settings.result_cache_k
            self.cache = ResultCache(settings.result_cache_entries, mib << 20, k)
            self.metrics.watch_cache(self.cache.lru)
        self.drift = DriftMonitor(settings.drift_window, settings.drift_threshold, settings.drift_min_images)
        self.metrics.watch_drift(self.drift)
        self.control = ModelControl(self)
        self.regions = Regions(self.handoff, settings.write_owners())  # the Open Inference Protocol's shm
        self.metrics.watch_models(self.control)
        self.accepting, self.port = False, 0
        self.pool: PipelinePool | None = None
        self._pool_healthy = True
        self._suggestions = itertools.count()  # shards_reply
        self.shards: ShardProcesses | None = None  # shards 1 … K−1, when this process is shard 0 of several
        self.on_status: Callable[[bool], None] | None = None  # a shard: tells the main process its health
        self._health = health.aio.HealthServicer()
        self._front: Front | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = False

    async def start(self, relay: socket.socket | None = None) -> int:
        """Bind, serve NOT_SERVING, start the workers, then SERVING: the port (a shard's gRPC: ``relay``)."""
        s = self.settings
        owners = s.owner_uids()
        try:
            tokens = load_tokens(s.tokens_file, owners) if s.tokens_file else None
        except (OSError, UnicodeDecodeError) as exc:
            raise RuntimeError(f"cannot read the tokens file {s.tokens_file}: {exc}") from None
        self.authenticator = Authenticator(tokens, s.tls_client_ca is not None, owners)
        self.handoff.prepare_dirs()
        raise_descriptor_limit(s.max_inflight_images + 256)  # a held file per batch in flight, at most
        for service in ("", SERVICE_NAME):
            await self._health.set(service, _NOT_SERVING)
        gate = (Gate(self),) if tokens else ()  # nothing to decide before a request is read otherwise
        handlers = self._handlers()
        front = make_front(s, handlers, gate, self.metrics.front_exits.inc, relay)
        try:
            self.port = await front.start()
            self._front = front
            if s.shards > 1 and not s.shard_index:
                self.shards = ShardProcesses(self._whole, lambda: self._spawn(self._set_health(self._pool_healthy)))
                self.registry.peers = self.shards.caller_usage  # each caller's work on the other shards
                await self.shards.start()
            self.pool = await asyncio.to_thread(self._start_pool, asyncio.get_running_loop())
            await self.control.align_shards()
        except BaseException:
            if self.pool is not None:  # started, and then a shard refused its models
                await asyncio.to_thread(self.pool.stop, 5.0, False)
            if self.shards is not None:
                await self.shards.stop()
            await front.stop(0)
            self.handoff.remove_staging_dir()
            raise
        self.follow_models()
        self.accepting = True
        await self._set_health(True)
        self._start_background_tasks()
        if s.metrics_port is not None:
            self.metrics.serve(s.metrics_port, s.host, self.shards)
        if s.null_model:
            log.warning("null model: images are read and header-checked only; results carry no detections")
        callers, sockets = self.authenticator.mode, [str(p) for p in (s.unix_socket, s.local_socket) if p]
        where = " and ".join(sockets if s.shard_index else [f"{s.host}:{self.port}", *sockets])  # a shard: no gRPC
        log.info("serving on %s with %d workers (%s); callers: %s", where, s.workers, s.device, callers)
        audit.control("started", host=s.host, port=self.port or None, unix_socket=str(s.unix_socket or "") or None,
                      local_socket=str(s.local_socket or "") or None, tls=s.tls_cert is not None, callers=callers,
                      workers=s.workers, device=s.device)  # fmt: skip
        return self.port

    def shards_reply(self) -> bytes:
        """A Session's first reply on the local socket: the shards; shard 0 suggests each in turn."""
        s = self.settings
        suggested = next(self._suggestions) % s.shards if not s.shard_index else s.shard_index
        shards = infer_pb2.Shards(count=s.shards, index=s.shard_index, suggested=suggested)
        return infer_pb2.SessionReply(shards=shards).SerializeToString()

    def _handlers(self) -> Handlers:
        """Every service's handlers: inference, model control, the Open Inference Protocol,
        health and reflection."""
        handlers = Handlers()
        inference = InferenceServicer(self)
        control = ModelControlServicer(self, self.control, inference.identify)
        self.oip = OpenInferenceServicer(self, inference.identify, inference.streams)
        handlers.add_generic_rpc_handlers((inference.handler(), control.handler(), self.oip.handler()))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, handlers)
        names = (SERVICE_NAME, CONTROL_SERVICE, OIP_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), handlers)
        return handlers

    def _start_background_tasks(self) -> None:
        """Upkeep (``front.upkeep``), expiry, and the repository poll and drift watch if asked for."""
        s = self.settings
        self._spawn(Upkeep(self).run())
        self._spawn(self._housekeeping())
        if s.repository_poll_s and not s.shard_index:  # the main process moves every shard
            self._spawn(self.control.poll(s.repository_poll_s))
        if s.drift_window and not s.shard_index:  # the main process judges every shard's window
            self._spawn(self.drift.run(s.drift_interval_s, self.shards.drift if self.shards else None))

    def _start_pool(self, loop: asyncio.AbstractEventLoop) -> PipelinePool:
        """Blocking (a thread): spawn the workers and wait until each loaded its models."""
        s = self.settings
        pool = PipelinePool(
            s.models_dir,
            self.control.first_options(s.worker_options()),
            workers=s.workers,
            max_attempts=s.max_attempts,
            max_chunk_seconds=s.max_chunk_seconds,
            loop=loop,
            on_outcomes=self._on_outcomes,
            on_health=self._on_health,
            on_shadow=self.control.on_shadow,
        )
        pool.start(timeout=s.startup_timeout_s)
        return pool

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; safe to call twice."""
        if self._stopped or self._front is None:
            return
        self._stopped, self.accepting, s = True, False, self.settings
        audit.control("draining", inflight_images=self.registry.inflight_images)
        shards = asyncio.ensure_future(self.shards.stop()) if self.shards is not None else None
        await self._health.enter_graceful_shutdown()
        if not await self.registry.wait_idle(s.drain_timeout_s):
            log.warning("drain timed out with %d images in flight", self.registry.inflight_images)
        await self._front.stop(s.stop_grace_s if grace is None else grace)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.pool is not None:
            await asyncio.to_thread(functools.partial(self.pool.stop, timeout=10.0, drain=True))
        # The pool's last outcomes may have finished batches whose release runs in a thread.
        await asyncio.gather(*self._background, return_exceptions=True)
        if shards is not None:
            await shards
        self.regions.close()
        self.handoff.remove_staging_dir()
        self.metrics.close()
        log.info("stopped")
        audit.control("stopped")

    async def push(
        self, request: infer_pb2.PushDataRequest, peer: str = "", identity: Identity | None = None,
        opened: BatchFile | None = None,
    ) -> Batch:  # fmt: skip
        """Validate and admit one push (PushData, or one push of a Session) of ``identity`` (the
        anonymous caller by default) from ``peer``; returns its batch. Every push leaves one audit
        line, whatever its verdict. ``opened``: the batch file, already open and checked (a shared
        memory region's, ``front.regions``); the request then gives its path and sizes only."""
        caller = identity or self.authenticator.anonymous
        try:
            batch, first = await self._admit(request, caller, peer, opened)
        except BaseException as exc:
            if opened is not None:
                self.handoff.release(opened)  # never admitted (a no-op if its submit released it)
            if not isinstance(exc, Exception):
                raise
            code, message = (exc.code, exc.message) if isinstance(exc, ServerError) else (_INTERNAL, "internal error")
            audit.push(peer, caller.name, request, "refused", code=code, reason=message)
            raise
        audit.push(peer, caller.name, request, "accepted" if first else "retry", batch_id=batch.batch_id)
        return batch

    async def _admit(
        self, request: infer_pb2.PushDataRequest, caller: Identity, peer: str, opened: BatchFile | None = None
    ) -> tuple[Batch, bool]:
        """The push's batch, and whether this request made it (False: a retry of its request_id)."""
        if not self.accepting:
            raise Unavailable("the server is not accepting batches (starting or draining)")
        request_id, s = request.request_id, self.settings
        if request_id and too_long(request_id, s.max_request_id_bytes):
            raise InvalidBatch(f"request_id is longer than {s.max_request_id_bytes} bytes")
        if request_id and peer.startswith("local:") and (home := request_shard(request_id, s.shards)) != s.shard_index:
            raise Refused(f"request_id {request_id!r} is shard {home}'s (--shards {s.shards}): push it on that "
                          "shard's local socket, where a retry finds it (the client library does so)")
        plan = self.handoff.plan(request.path, request.data, request.sizes, request.names)
        deadline = time.monotonic() + self.settings.batch_deadline_s
        fingerprint = request_fingerprint(request) if request_id else b""
        reservation = self.registry.reserve(
            request_id, plan.images, plan.total_bytes, deadline, fingerprint, owner=caller.name
        )
        if not reservation.is_new:
            # Shielded: a retry giving up must not cancel the first request's future (a retry's is set).
            return await asyncio.shield(reservation.ready), False  # type: ignore[arg-type]
        batch = reservation.batch
        try:
            file = opened or await self.materialize(plan, caller.file_owners)
            hits, todo = await self._consult_cache(batch, file, caller) if self.cache else ([], list(file.images))
            if todo:
                self.submit(batch, file, todo)
        except BaseException as exc:
            self.registry.abandon(reservation, exc)
            raise
        self.registry.activate(reservation, file)
        self.metrics.batch_accepted(batch.size)
        if hits:  # answered now; the batch may even be complete
            self._on_outcomes(hits)
        return batch, True

    async def _consult_cache(
        self, batch: Batch, file: BatchFile, caller: Identity
    ) -> tuple[list[ImageOutcome], list[ImageRef]]:
        """The batch's images the cache answers and those left for the workers. Hashing reads the
        images (in a thread); a push cancelled meanwhile still lets go of its file."""
        assert self.cache is not None
        task = asyncio.ensure_future(asyncio.to_thread(self.cache.keys, file, caller.name))
        try:
            keys = await asyncio.shield(task)
        except BaseException:
            task.add_done_callback(lambda _: self.handoff.release(file))
            raise
        return self.cache.split(batch.batch_id, file, keys)

    async def materialize(self, plan: BatchPlan, owners: frozenset[int]) -> BatchFile:
        """Validate or stage a batch (in a thread unless it is a client file on, or small data staged
        into, a memory file system: see ``handoff``) of a caller that may push files of ``owners``;
        a cancelled push still cleans up its staging copy."""
        if plan.path is not None and self.handoff.in_memory:
            return self.handoff.materialize(plan, owners)
        if plan.data is not None and (staged := self.handoff.stage_on_loop(plan.data, plan.images)):
            return staged
        task = asyncio.ensure_future(asyncio.to_thread(self.handoff.materialize, plan, owners))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(
                lambda t: None if t.cancelled() or t.exception() else self.handoff.release(t.result())
            )
            raise

    def submit(self, batch: Batch, file: BatchFile, images: list[ImageRef]) -> None:
        """Hand the batch's ``images`` to the pool; a pool that refuses them makes the push UNAVAILABLE."""
        assert self.pool is not None
        try:
            self.pool.submit_batch(batch.batch_id, file.file, images, batch.deadline, self.control.route())
        except PipelineError as exc:
            log.warning("pool refused batch %s: %s", batch.batch_id, exc)
            if self.cache is not None:
                self.cache.forget(batch.batch_id, images)
            self.handoff.release(file)
            raise Unavailable("the pipeline is not accepting batches; retry later") from None

    def _on_finished(self, batch: Batch) -> None:
        """Every image answered: the file's descriptor closes and a staging copy goes (or becomes a
        spare, ``front.staging``) — at once on a memory file system (before any stream sends the
        last result), else in a thread."""
        if self.cache is not None:
            self.cache.forget(batch.batch_id, list(batch.images))  # answered without a worker (deadline)
        if batch.file is None:
            return
        if batch.file.staged and (batch.file.tier > 0 or not self.handoff.in_memory):  # a disk unlink
            self._spawn(asyncio.to_thread(self.handoff.release, batch.file))
        else:
            self.handoff.release(batch.file)

    def _on_outcomes(self, outcomes: list[ImageOutcome]) -> None:
        """The pool, on the loop: images answered (each exactly once). They are recorded whatever
        befalls the counting before: a result is never lost to a metric."""
        try:
            self.metrics.images_done(outcomes)
            self.drift.observe(*outcomes)
            if self.cache is not None:
                for outcome in outcomes:
                    if not outcome.cached:
                        self.cache.store(outcome)
        finally:
            self.registry.record(*outcomes)

    def _on_health(self, healthy: bool) -> None:
        """The pool, on the loop: a worker died (False) or every worker is back (True)."""
        self._pool_healthy = healthy
        if healthy:
            self.follow_models()  # a replacement may have loaded other models
        self._spawn(self._set_health(healthy))

    def follow_models(self) -> None:
        """What depends on the models follows what the workers loaded: the cache's key (another
        model, device or the null model is another key; what it held for anything else goes)
        and the drift watch's reference profile."""
        if self.pool is None:
            return
        if self.cache is not None:
            self.cache.reset((self.settings.device, self.settings.null_model, self.pool.models))
        self.drift.use(self.pool.report.profile, self.pool.models[0] if self.pool.models else ("", ""))

    async def _set_health(self, healthy: bool) -> None:
        every_shard = self.shards is None or self.shards.serving
        status = _SERVING if healthy and self.accepting and every_shard else _NOT_SERVING
        self.metrics.health(status == _SERVING)
        if self.on_status is not None:
            self.on_status(status == _SERVING)
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
