"""Models that change while the server runs: the operator's choices and the ``ModelControlService``.

In the server's main process, on the loop. ``ModelControl`` keeps what operators chose, which version
each model is pinned to and which attribute models are unloaded, and turns every change into new
``WorkerOptions`` that the pool moves its workers to one at a time (``PipelinePool.reload``, in a
thread; ``supervisor.rollout`` says how nothing is lost). The workers are the judges of a
version: the front never opens a model (``tests/unit/test_boundaries.py``), it learns the repository
from what the workers report (``PipelinePool.catalog``, ``PipelinePool.models``).

Who may change models: ``--model-control explicit`` (the default) and a caller named in
``--control-callers``; every change leaves an audit line. ``--repository-poll-s`` reads the
repository again whenever its files change (names, sizes and times of every file under it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_proto import infer_pb2
from infer_server.front import audit
from infer_server.front.errors import PermissionDeniedError, Refused, UnknownModel, rpc_boundary
from infer_server.front.identity import Identity
from infer_server.supervisor.rollout import ReloadRefused

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer
    from infer_server.supervisor.pool import PipelinePool

log = logging.getLogger(__name__)

_VERSION = re.compile(r"[1-9][0-9]*")  # a version directory's name
CONTROL_SERVICE = infer_pb2.DESCRIPTOR.services_by_name["ModelControlService"].full_name


def repository_fingerprint(root: str) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``root`` (symlinks followed) as (path, size, mtime in ns): what changes when
    a version directory, a model file or a config is added, replaced or removed."""
    seen = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return tuple(seen)


class ModelControl:
    """The operator's model choices for one server, and the changes that apply them."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        settings = server.settings
        self.enabled = settings.model_control == "explicit"
        self.callers = frozenset(c.strip() for c in settings.control_callers.split(",") if c.strip())
        self.timeout_s = settings.reload_timeout_s
        self.pins: dict[str, str] = {}  # model → version an operator chose
        self.unloaded: set[str] = set()
        self.previous: dict[str, str] = {}  # model → the version that served before its last change
        self.errors: dict[str, str] = {}  # model → why its last change was refused
        self._lock = asyncio.Lock()  # one change at a time (the pool refuses a second anyway)

    @property
    def pool(self) -> PipelinePool:
        assert self.server.pool is not None
        return self.server.pool

    def check_caller(self, identity: Identity) -> None:
        if not self.enabled:
            raise PermissionDeniedError("model control is off on this server (--model-control none)")
        if identity.name not in self.callers:
            raise PermissionDeniedError(f"caller {identity.name!r} may not change models (--control-callers)")

    # --------------------------------------------------------------------------------- state
    def serving(self) -> dict[str, str]:
        return dict(self.pool.models)

    def status(self) -> infer_pb2.ListModelsReply:
        serving = self.serving()
        reply = infer_pb2.ListModelsReply()
        for name, kind, versions in self._catalog():
            reply.models.add(
                name=name, kind=kind, state="READY" if name in serving else "UNLOADED",
                version=serving.get(name, ""), versions=versions, pinned=self.pins.get(name, ""),
                previous=self.previous.get(name, ""), last_error=self.errors.get(name, ""),
            )  # fmt: skip
        return reply

    def _catalog(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The models the workers reported, with the version directories on disk now (added since
        the workers last read the repository; a listing, never a parse: the workers judge them)."""
        listed = []
        for name, kind, versions in self.pool.catalog:
            try:
                found = {d for d in os.listdir(self.pool.repo_dir / name) if _VERSION.fullmatch(d)}
                found = {d for d in found if (self.pool.repo_dir / name / d / "model.onnx").is_file()}
            except OSError:
                found = set()
            listed.append((name, kind, tuple(sorted({*versions, *found}, key=int))))
        return listed

    def _model(self, name: str) -> tuple[str, tuple[str, ...]]:
        """(kind, versions on disk) of ``name``, or ``UnknownModel``."""
        for listed, kind, versions in self._catalog():
            if listed == name:
                return kind, versions
        raise UnknownModel(f"no model named {name!r} in the repository")

    # ------------------------------------------------------------------------------- changes
    async def load(self, name: str, version: str, who: str) -> None:
        """Serve ``version`` of ``name`` (empty: the version policy's choice, read again)."""
        if not name:
            if version:
                raise UnknownModel("a version needs the name of its model")
            return await self._change(lambda pins, unloaded: None, "", who, "reload")
        _, versions = self._model(name)
        if version and version not in versions:
            raise UnknownModel(f"model {name!r} has no version {version!r} (it has {', '.join(versions) or 'none'})")

        def choose(pins: dict[str, str], unloaded: set[str]) -> None:
            unloaded.discard(name)
            if version:
                pins[name] = version
            else:
                pins.pop(name, None)

        await self._change(choose, name, who, "load", version=version or None)

    async def unload(self, name: str, who: str) -> None:
        kind, _ = self._model(name)
        if kind == "detector":
            raise Refused(f"{name} is the detector: every image goes through it, it cannot be unloaded")
        await self._change(lambda pins, unloaded: unloaded.add(name), name, who, "unload")

    async def rollback(self, name: str, who: str) -> None:
        self._model(name)
        back = self.previous.get(name)
        if back is None:
            raise Refused(f"no earlier version of {name} served on this server: nothing to roll back to")
        await self._change(lambda pins, unloaded: pins.__setitem__(name, back), name, who, "rollback", version=back)

    async def reread(self) -> None:
        """The repository's files changed (``--repository-poll-s``): move to what it holds now."""
        await self._change(lambda pins, unloaded: None, "", "repository poll", "reload")

    async def _change(
        self, choose: Callable[[dict[str, str], set[str]], None], name: str, who: str, action: str, **details: Any
    ) -> None:
        """Apply ``choose`` to a copy of the choices and move the workers there; on refusal nothing
        changes and the reason is kept for ``ListModels``."""
        if self._lock.locked():
            raise Refused("another model change is under way; retry when it is done")
        async with self._lock:
            pins, unloaded = dict(self.pins), set(self.unloaded)
            choose(pins, unloaded)
            options = dataclasses.replace(
                self.pool.options, pins=tuple(sorted(pins.items())), unloaded=tuple(sorted(unloaded))
            )
            before = self.serving()
            try:
                await asyncio.to_thread(self.pool.reload, options, self.timeout_s)
            except (ReloadRefused, TimeoutError) as exc:
                why = self._redacted(str(exc))
                self.errors[name or "*"] = why
                audit.control(f"model {action} refused", model=name or None, caller=who, reason=why, **details)
                raise Refused(f"{action} of {name or 'the repository'} refused: {why}") from None
            self.pins, self.unloaded = pins, unloaded
            after = self.serving()
            for model, version in before.items():
                if after.get(model) != version:
                    self.previous[model] = version
            self.errors.pop(name or "*", None)
            self.server.key_cache_on_models()
            audit.control(f"model {action}", model=name or None, caller=who, serving=after, **details)

    def _redacted(self, reason: str) -> str:
        """A worker's reason without the repository's place on the host (every caller may list it)."""
        root = self.pool.repo_dir
        for place in sorted({str(root.absolute()), os.path.realpath(root), str(root)}, key=len, reverse=True):
            reason = reason.replace(place, "<models>")
        return reason

    async def poll(self, interval_s: float) -> None:
        """Read the repository again whenever its files change (an asyncio task)."""
        root = str(self.pool.repo_dir)
        seen = await asyncio.to_thread(repository_fingerprint, root)
        while True:
            await asyncio.sleep(interval_s)
            now = await asyncio.to_thread(repository_fingerprint, root)
            if now == seen:
                continue
            seen = now
            log.info("the model repository changed: moving the workers to what it holds")
            try:
                await self.reread()
            except Refused as exc:
                log.warning("%s; the serving models serve on", exc.message)


class ModelControlServicer:
    """``infer.v1.ModelControlService`` of one server (``ModelControl`` does the work)."""

    def __init__(self, server: InferenceServer, control: ModelControl, identify: Callable[..., Identity]) -> None:
        self._server, self._control, self._identify = server, control, identify

    def handler(self) -> grpc.GenericRpcHandler:
        def unary(method: Callable[..., Any], request: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(
                method, request.FromString, infer_pb2.ListModelsReply.SerializeToString
            )

        return grpc.method_handlers_generic_handler(
            CONTROL_SERVICE,
            {
                "ListModels": unary(self.ListModels, infer_pb2.ListModelsRequest),
                "LoadModel": unary(self.LoadModel, infer_pb2.LoadModelRequest),
                "UnloadModel": unary(self.UnloadModel, infer_pb2.UnloadModelRequest),
                "RollbackModel": unary(self.RollbackModel, infer_pb2.RollbackModelRequest),
            },
        )

    def _operator(self, context: grpc.aio.ServicerContext, rpc: str) -> str:
        identity = self._identify(context, rpc)
        try:
            self._control.check_caller(identity)
        except PermissionDeniedError as exc:
            audit.refused_call(context.peer(), rpc, exc.code, exc.message, identity.name)
            raise
        return identity.name

    @rpc_boundary
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        self._identify(context, "ListModels")
        return self._control.status()

    @rpc_boundary
    async def LoadModel(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        await self._control.load(request.name, request.version, self._operator(context, "LoadModel"))
        return self._control.status()

    @rpc_boundary
    async def UnloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        await self._control.unload(request.name, self._operator(context, "UnloadModel"))
        return self._control.status()

    @rpc_boundary
    async def RollbackModel(self, request: Any, context: grpc.aio.ServicerContext) -> infer_pb2.ListModelsReply:
        await self._control.rollback(request.name, self._operator(context, "RollbackModel"))
        return self._control.status()
