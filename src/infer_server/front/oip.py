"""The Open Inference Protocol (``inference.GRPCInferenceService``, KServe v2) beside ``infer.v1``,
on the same port, so tritonclient and the tools built on it work against this server unchanged.

In the server's main process, on the loop, over the same machinery as ``infer.v1``: a ModelInfer
is one push (``InferenceServer.push``: the same admission, quotas, staging, workers and exactly-once
bookkeeping, the same audit line) whose results are collected from the batch's cursor and
returned as tensors. ``docs/open-inference-protocol.md`` is the user's view.

The one model, ``pipeline`` (version "1"): input ``IMAGES`` BYTES [N] (encoded JPEG/PNG images);
outputs, one row per image:

- ``DETECTIONS`` BYTES [N]: JSON, ``{"status": {"code", "message"}, "width", "height",
  "detections": [{"label", "class_id", "score", "box": [x1, y1, x2, y2], "attributes": {model:
  {"label", "score"}}}], "model_versions": {...}}``;
- ``STATUS`` INT32 [N]: the image's gRPC status code (0 OK; e.g. 3 for an image that does not
  decode): a per-image failure does not fail the request, as in ``infer.v1``;
- ``COUNT`` INT32 [N], ``BOXES`` FP32 [N, K, 4], ``SCORES`` FP32 [N, K], ``CLASSES`` INT32 [N, K]:
  the detections as fixed-shape tensors, K the most any image of the request has, padded with 0.

Inputs come inline (``raw_input_contents`` or ``contents.bytes_contents``) or from a registered
system-shared-memory region (``front.regions``); an output goes back in the response or, when the
request names a region for it, into that region.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_proto import infer_pb2, inference_pb2
from infer_server.front.errors import (
    InvalidBatch,
    ServerError,
    Unavailable,
    UnknownBatch,
    UnknownModel,
    rpc_boundary,
    status_for,
)
from infer_server.front.handoff import STAGE_ON_LOOP_BYTES
from infer_server.front.identity import Identity
from infer_server.front.oip_answers import INPUT, MODEL, OUTPUTS, VERSION, Statistics, response, split_bytes, tensors
from infer_server.front.service import StreamSlots, readable, reader
from infer_server.messages import ImageOutcome

if TYPE_CHECKING:
    from infer_server.front.handoff import BatchFile
    from infer_server.front.server import InferenceServer

ON_LOOP_IMAGES = 32  # a shared-memory input of at most this many images is opened on the loop (tmpfs)
OIP_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The protocol's methods this server does not serve: answered UNIMPLEMENTED, saying so.
_NOT_SERVED = ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
               "CudaSharedMemoryRegister", "TraceSetting", "LogSettings")  # fmt: skip
try:
    _VERSION = importlib.metadata.version("infer-server")
except importlib.metadata.PackageNotFoundError:  # run from a source tree without an install
    _VERSION = "0"


class OpenInferenceServicer:
    """``inference.GRPCInferenceService`` of one server."""

    def __init__(self, server: InferenceServer, identify: Callable[..., Identity], streams: StreamSlots) -> None:
        self._server, self._identify, self._streams = server, identify, streams
        self.stats = Statistics()

    def handler(self) -> grpc.GenericRpcHandler:
        limit = self._server.settings.max_message_bytes

        def unary(method: Callable[..., Any], request: Any, reply: Any) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(method, reader(request, limit), reply.SerializeToString)

        p = inference_pb2
        handlers = {
            "ServerLive": unary(self.ServerLive, p.ServerLiveRequest, p.ServerLiveResponse),
            "ServerReady": unary(self.ServerReady, p.ServerReadyRequest, p.ServerReadyResponse),
            "ModelReady": unary(self.ModelReady, p.ModelReadyRequest, p.ModelReadyResponse),
            "ServerMetadata": unary(self.ServerMetadata, p.ServerMetadataRequest, p.ServerMetadataResponse),
            "ModelMetadata": unary(self.ModelMetadata, p.ModelMetadataRequest, p.ModelMetadataResponse),
            "ModelConfig": unary(self.ModelConfig, p.ModelConfigRequest, p.ModelConfigResponse),
            "ModelInfer": unary(self.ModelInfer, p.ModelInferRequest, p.ModelInferResponse),
            "ModelStatistics": unary(self.ModelStatistics, p.ModelStatisticsRequest, p.ModelStatisticsResponse),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                self.ModelStreamInfer, reader(p.ModelInferRequest, limit), p.ModelStreamInferResponse.SerializeToString
            ),
            **{name: grpc.unary_unary_rpc_method_handler(self._not_served(name)) for name in _NOT_SERVED},
            **{f"CudaSharedMemory{call}": unary(self._no_cuda_regions(f"CudaSharedMemory{call}", reply), request, reply)
               for call, request, reply in (
                   ("Status", p.CudaSharedMemoryStatusRequest, p.CudaSharedMemoryStatusResponse),
                   ("Unregister", p.CudaSharedMemoryUnregisterRequest, p.CudaSharedMemoryUnregisterResponse))},
        }  # fmt: skip
        regions = self._server.regions
        handlers |= regions.handlers(self._identify)
        return grpc.method_handlers_generic_handler(OIP_SERVICE, handlers)

    @staticmethod
    def _not_served(method: str) -> Callable[..., Any]:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served here: models change through "
                                "infer.v1.ModelControlService, and only system shared memory is supported")  # fmt: skip

        return refuse

    def _no_cuda_regions(self, method: str, reply: Any) -> Callable[..., Any]:
        """CUDA shared memory's status and unregister: no CUDA region can be registered here, so all
        of them is none (what load tools unregister when they finish) and a named one is unknown."""

        @rpc_boundary
        async def answer(_: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._identify(context, method)
            name = readable(request).name
            if name:
                raise UnknownBatch(f"no CUDA shared memory region named {name!r} is registered")
            return reply()

        return functools.partial(answer, None)  # rpc_boundary wraps methods: no self here

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.ServerReadyResponse(ready=self._ready())

    def _ready(self) -> bool:
        pool = self._server.pool
        return self._server.accepting and pool is not None and pool.healthy

    @staticmethod
    def _model(name: str, version: str) -> None:
        if name != MODEL or version not in ("", VERSION):
            raise UnknownModel(f"unknown model {name!r} version {version!r}: this server serves {MODEL!r} version 1")

    @rpc_boundary
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._identify(context, "ModelReady")
        request = readable(request)
        known = request.name == MODEL and request.version in ("", VERSION)
        return inference_pb2.ModelReadyResponse(ready=known and self._ready())

    @rpc_boundary
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return inference_pb2.ServerMetadataResponse(name="infer-server", version=_VERSION,
                                                    extensions=["system_shared_memory", "statistics"])  # fmt: skip

    @rpc_boundary
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._identify(context, "ModelMetadata")
        request = readable(request)
        self._model(request.name, request.version)
        reply = inference_pb2.ModelMetadataResponse(name=MODEL, versions=[VERSION], platform="infer-server")
        reply.inputs.add(name=INPUT, datatype="BYTES", shape=[-1])
        for name, (datatype, shape) in OUTPUTS.items():
            reply.outputs.add(name=name, datatype=datatype, shape=shape)
        return reply

    @rpc_boundary
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._identify(context, "ModelConfig")
        request = readable(request)
        self._model(request.name, request.version)
        types = {"BYTES": inference_pb2.TYPE_STRING, "INT32": inference_pb2.TYPE_INT32, "FP32": inference_pb2.TYPE_FP32}
        config = inference_pb2.ModelConfig(name=MODEL, platform="infer-server", backend="infer-server")
        config.input.add(name=INPUT, data_type=inference_pb2.TYPE_STRING, dims=[-1])
        for name, (datatype, shape) in OUTPUTS.items():
            config.output.add(name=name, data_type=types[datatype], dims=shape)
        return inference_pb2.ModelConfigResponse(config=config)

    @rpc_boundary
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._identify(context, "ModelStatistics")
        request = readable(request)
        if request.name:
            self._model(request.name, request.version)
        s = self.stats
        model = inference_pb2.ModelStatistics(name=MODEL, version=VERSION, last_inference=s.last_ms,
                                              inference_count=s.images, execution_count=s.success[0],
                                              inference_stats=s.message())  # fmt: skip
        return inference_pb2.ModelStatisticsResponse(model_stats=[model])

    @rpc_boundary
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        identity = self._identify(context, "ModelInfer")
        return await self.infer(readable(request), context.peer(), identity)

    async def ModelStreamInfer(self, requests: Any, context: grpc.aio.ServicerContext) -> Any:
        """Each request answered on the stream in turn; one that fails carries ``error_message`` (and
        its id) and the stream goes on. The stream counts against the stream quotas and ends
        UNAVAILABLE after ``--stream-idle-timeout-s`` without a request, as a Session does."""
        try:
            identity = self._identify(context, "ModelStreamInfer")
            slot = self._streams.open(identity.name)
            slot.__enter__()
        except ServerError as exc:
            await context.abort(exc.code, exc.message)
        try:
            idle = self._server.settings.stream_idle_timeout_s
            while True:
                try:
                    request = await asyncio.wait_for(requests.__anext__(), idle)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"no request for {idle:g} s: stream closed")
                try:
                    answer = await self.infer(readable(request), context.peer(), identity)
                except Exception as exc:  # the protocol's way: this request fails, the stream goes on
                    code, message = status_for(exc, "ModelStreamInfer")
                    failed = inference_pb2.ModelInferResponse(id=getattr(request, "id", ""), model_name=MODEL)
                    yield inference_pb2.ModelStreamInferResponse(error_message=f"{code.name}: {message}",
                                                                 infer_response=failed)  # fmt: skip
                    continue
                yield inference_pb2.ModelStreamInferResponse(infer_response=answer)
        finally:
            slot.__exit__(None, None, None)

    async def infer(self, request: Any, peer: str, identity: Identity) -> inference_pb2.ModelInferResponse:
        """One request: its images pushed as one batch, its results collected and returned."""
        self._model(request.model_name, request.model_version)
        wanted = [o.name for o in request.outputs]
        unknown = [name for name in wanted if name not in OUTPUTS]
        if unknown:
            raise InvalidBatch(f"unknown outputs {unknown}: the outputs are {list(OUTPUTS)}")
        into = {o.name: o.parameters for o in request.outputs if "shared_memory_region" in o.parameters}
        for parameters in into.values():
            self._server.regions.region(identity, parameters["shared_memory_region"].string_param)  # or NOT_FOUND
        started = time.monotonic()
        outcomes: list[ImageOutcome] = []
        try:
            push, opened = await self._push_request(request, identity)
            batch = await self._server.push(push, peer, identity, opened)
            outcomes = await self._collect(batch.batch_id, identity)
            if len(outcomes) != batch.size:
                raise Unavailable("the request's results expired before they were collected; send it again")
            built = tensors(outcomes)
            if into:  # every output asked into a region, on the loop or in one trip to a thread
                writes = [(parameters, built[name][0]) for name, parameters in into.items()]
                if self._server.handoff.in_memory and sum(len(data) for _, data in writes) <= STAGE_ON_LOOP_BYTES:
                    self._server.regions.write_all(identity, writes)
                else:
                    await asyncio.to_thread(self._server.regions.write_all, identity, writes)
            self._server.registry.discard(batch.batch_id)  # delivered here, and nobody can ask again
            return response(request.id, built, wanted, into)
        finally:
            self.stats.record(outcomes, time.monotonic() - started)

    async def _push_request(
        self, request: Any, identity: Identity
    ) -> tuple[infer_pb2.PushDataRequest, BatchFile | None]:
        """The push that carries the request's images: inline, or the region's file itself, its
        images read in place by the workers (``Regions.batch``: no image byte through the front)."""
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            raise InvalidBatch(f"{MODEL} takes one input, {INPUT!r} (BYTES [N] of encoded images)")
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES" or len(tensor.shape) != 1 or tensor.shape[0] < 1:
            raise InvalidBatch(f"{INPUT} is BYTES of shape [N], N >= 1; got {tensor.datatype} {list(tensor.shape)}")
        count = int(tensor.shape[0])
        if count > self._server.settings.max_batch_images:
            raise InvalidBatch(f"a request holds at most {self._server.settings.max_batch_images} images")
        given = ("shared_memory_region" in tensor.parameters) + bool(request.raw_input_contents) + bool(
            tensor.contents.bytes_contents)  # fmt: skip
        if given != 1:
            raise InvalidBatch(f"{INPUT}'s data must come one way: raw_input_contents, contents, or shared memory")
        if "shared_memory_region" in tensor.parameters:
            opened, sizes = await self._region_batch(tensor.parameters, count, identity)
            return infer_pb2.PushDataRequest(path=opened.path, sizes=sizes), opened
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidBatch("raw_input_contents must hold one entry per input")
            images = split_bytes(request.raw_input_contents[0], count)
        else:
            images = list(tensor.contents.bytes_contents)
            if len(images) != count:
                raise InvalidBatch(f"{INPUT} has shape [{count}] but {len(images)} elements")
        return infer_pb2.PushDataRequest(data=b"".join(images), sizes=[len(i) for i in images]), None

    async def _region_batch(self, parameters: Any, count: int, identity: Identity) -> tuple[BatchFile, list[int]]:
        """``Regions.batch``: on the loop when the shared directory is a memory file system and the
        input holds at most ``ON_LOOP_IMAGES`` (a path walk, an fstat and a 4-byte read per image,
        none of which waits for a device, as a client file is validated there,
        ``InferenceServer.materialize``; the bound keeps what a swapped-out page could cost small),
        else in a thread; a call cancelled meanwhile still lets go of what it opened."""
        handoff = self._server.handoff
        if handoff.in_memory and count <= ON_LOOP_IMAGES:
            return self._server.regions.batch(identity, parameters, count)
        task = asyncio.ensure_future(asyncio.to_thread(self._server.regions.batch, identity, parameters, count))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(lambda t: None if t.cancelled() or t.exception() else handoff.release(t.result()[0]))
            raise

    async def _collect(self, batch_id: str, identity: Identity) -> list[ImageOutcome]:
        """Every outcome of the batch, by index (each acknowledged: this call delivers it)."""
        outcomes: dict[int, ImageOutcome] = {}
        with self._server.registry.subscribe([batch_id], identity.name) as cursor:
            while (outcome := await cursor.next()) is not None:
                outcomes[outcome.index] = outcome
                cursor.ack([outcome])
        return [outcomes[i] for i in sorted(outcomes)]
