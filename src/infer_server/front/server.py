"""The server's main process: the gRPC front's lifecycle and what every push goes through.

``infer_server.cli`` creates one :class:`InferenceServer` on an asyncio event loop; the integration
tests start that command as a subprocess. The RPC handlers (``front.service``) call ``push``;
everything a request touches lives on the loop (``BatchRegistry``) or in a thread for filesystem
work (``Handoff``); the stage workers are separate processes owned by the supervisor
(``PipelinePool``), whose outcome and health callbacks run on the same loop.

Lifecycle: ``start()`` binds the port and serves health NOT_SERVING while the pool spawns its
workers (spawn context, so the gRPC objects already created are never forked) and waits for every
one to load its models; then SERVING. ``stop()`` turns health NOT_SERVING, refuses new batches
(UNAVAILABLE), lets in-flight batches finish within ``drain_timeout_s``, stops the gRPC server
with a grace period for open streams, stops the pool, and removes the server's staging directory.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import resource
import time
import zlib
from collections.abc import Coroutine
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infer_proto import infer_pb2, infer_pb2_grpc
from infer_server.front import audit
from infer_server.front.batches import Batch, BatchRegistry
from infer_server.front.directories import run_janitor
from infer_server.front.errors import InvalidBatch, ServerError, Unavailable
from infer_server.front.handoff import BatchFile, BatchPlan, Handoff, HandoffLimits, too_long
from infer_server.front.metrics import ServerMetrics
from infer_server.front.service import InferenceServicer
from infer_server.messages import ImageOutcome
from infer_server.settings import ServerSettings
from infer_server.supervisor.pool import PipelineError, PipelinePool

log = logging.getLogger(__name__)

SERVICE_NAME = infer_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_INTERNAL = grpc.StatusCode.INTERNAL


def _fingerprint(request: infer_pb2.PushDataRequest) -> bytes:
    """What makes a push the same push: its sizes, names and, inline, a checksum of its bytes.

    Not the path: a client library that retries writes the same images into a new batch file.
    Until callers have identities, this stops a request_id reused by mistake or guessed blindly,
    not one reused by a caller who knows the first request's sizes (docs/security.md)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"inline" if request.data else b"file")
    digest.update(f"{len(request.sizes)}:{len(request.names)}".encode())
    for part in (*map(str, request.sizes), *request.names):
        encoded = part.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))  # length-prefixed: no two lists run together
        digest.update(encoded)
    digest.update(zlib.crc32(request.data).to_bytes(4, "little"))
    return digest.digest()


def _raise_descriptor_limit(needed: int) -> None:
    """The front holds every in-flight batch's file open: lift the soft limit on descriptors to the
    hard one if it is lower than ``needed``, and say so if even the hard one is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, needed))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("only %d file descriptors allowed (ulimit -n), %d wanted: lower --max-inflight-images "
                    "or raise the hard limit", soft, needed)  # fmt: skip


class InferenceServer:
    """One server: gRPC front, batch registry, tmpfs handoff and the stage-worker pool."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.handoff = Handoff(
            settings.shm_dir,
            settings.staging,
            HandoffLimits(
                settings.max_batch_images, settings.max_batch_bytes, settings.max_name_bytes, settings.max_path_bytes
            ),
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
        self._background: set[asyncio.Task[Any]] = set()
        self._stopped = False

    async def start(self) -> int:
        """Bind, serve NOT_SERVING, start the workers, then SERVING; returns the bound port."""
        s = self.settings
        self.handoff.prepare_dirs()
        _raise_descriptor_limit(s.max_inflight_images + 256)  # a held file per batch in flight, at most
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
            self.pool = await asyncio.to_thread(self._start_pool, asyncio.get_running_loop())
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
        audit.control("started", host=s.host, port=self.port, workers=s.workers, device=s.device)
        return self.port

    def _start_pool(self, loop: asyncio.AbstractEventLoop) -> PipelinePool:
        """Blocking (a thread): spawn the workers and wait until each loaded its models."""
        s = self.settings
        pool = PipelinePool(
            s.models_dir,
            s.worker_options(),
            workers=s.workers,
            max_attempts=s.max_attempts,
            max_chunk_seconds=s.max_chunk_seconds,
            loop=loop,
            on_outcome=self._on_outcome,
            on_health=self._on_health,
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
        audit.control("draining", inflight_images=self.registry.inflight_images)
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
        # The pool's last outcomes may have finished batches whose release runs in a thread.
        await asyncio.gather(*self._background, return_exceptions=True)
        self.handoff.remove_staging_dir()
        self.metrics.close()
        log.info("stopped")
        audit.control("stopped")

    async def push(self, request: infer_pb2.PushDataRequest, peer: str = "") -> Batch:
        """Validate and admit one push (PushData, or one push of a Session) from ``peer``; returns its
        batch. Every push leaves one audit line, whatever its verdict."""
        try:
            batch, first = await self._admit(request)
        except Exception as exc:
            code, message = (exc.code, exc.message) if isinstance(exc, ServerError) else (_INTERNAL, "internal error")
            audit.push(peer, request, "refused", code=code, reason=message)
            raise
        audit.push(peer, request, "accepted" if first else "retry", batch_id=batch.batch_id)
        return batch

    async def _admit(self, request: infer_pb2.PushDataRequest) -> tuple[Batch, bool]:
        """The push's batch, and whether this request made it (False: a retry of its request_id)."""
        if not self.accepting:
            raise Unavailable("the server is not accepting batches (starting or draining)")
        request_id = request.request_id
        if request_id and too_long(request_id, self.settings.max_request_id_bytes):
            raise InvalidBatch(f"request_id is longer than {self.settings.max_request_id_bytes} bytes")
        plan = self.handoff.plan(request.path, request.data, request.sizes, request.names)
        deadline = time.monotonic() + self.settings.batch_deadline_s
        fingerprint = _fingerprint(request) if request_id else b""
        reservation = self.registry.reserve(request_id, plan.images, plan.total_bytes, deadline, fingerprint)
        if not reservation.is_new:
            # Shielded: a retry giving up must not cancel the first request's future.
            return await asyncio.shield(reservation.ready), False
        batch = reservation.batch
        try:
            file = await self.materialize(plan)
            self.submit(batch, file)
        except BaseException as exc:
            self.registry.abandon(reservation, exc)
            raise
        self.registry.activate(reservation, file)
        self.metrics.batch_accepted(batch.size)
        return batch, True

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
            self.pool.submit_batch(batch.batch_id, file.file, file.images, batch.deadline)
        except PipelineError as exc:
            log.warning("pool refused batch %s: %s", batch.batch_id, exc)
            self.handoff.release(file)
            raise Unavailable("the pipeline is not accepting batches; retry later") from None

    def _on_finished(self, batch: Batch) -> None:
        """Every image answered: the file's descriptor closes and a staging copy goes — at once on a
        memory file system (before any stream sends the last result), else in a thread."""
        if batch.file is None:
            return
        if batch.file.staged and not self.handoff.in_memory:
            self._spawn(asyncio.to_thread(self.handoff.release, batch.file))
        else:
            self.handoff.release(batch.file)

    def _on_outcome(self, outcome: ImageOutcome) -> None:
        """The pool, on the loop: one image answered (exactly once)."""
        self.metrics.image_done(outcome)
        self.registry.record(outcome)

    def _on_health(self, healthy: bool) -> None:
        """The pool, on the loop: a worker died (False) or every worker is back (True)."""
        self._spawn(self._set_health(healthy))

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
