"""REST/JSON baseline: the product's pipeline behind stdlib HTTP with base64 images in JSON.

Not part of the product: it exists so ``benchmarks/fps.py`` can say what the tmpfs handoff buys
over the usual way of serving a model. Started as::

    python -m benchmarks.baselines.rest_server --models DIR --port 0 --workers 2 --batch-size 8 [--null-model]

and prints ``listening on HOST:PORT`` once every worker loaded its pipeline (the product's line).

Processes, kept the same as the product's so that only the data path differs:
* this process: the HTTP front, ``ThreadingHTTPServer`` (one thread per keep-alive connection);
* ``workers`` spawn-context processes (``ProcessPoolExecutor``), each holding one
  ``infer_server.stage.pipeline.VisionPipeline`` — or ``NullPipeline`` with ``--null-model`` — with one
  thread per library (``infer_server.stage.worker.limit_threads``), fed chunks of ``batch_size`` images.

The data path, which is what is measured: the client base64-encodes the images into one JSON body;
the front parses it, decodes the base64, and pickles each chunk's bytes to a worker through the
pool's queue; outcomes come back pickled and leave as one JSON document per request (no streaming).

API: ``POST /v1/infer`` ``{"images": [{"name": str, "data": base64}]}`` → ``{"results": [...]}``
(the ``ImageResult.to_dict`` shape, by index); ``GET /healthz`` → 200.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import multiprocessing
import os
import signal
import threading
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# Only stdlib-light imports at module level: worker processes import this module before
# limit_threads() runs, and NumPy / ONNX Runtime / DALI must see the thread limits first.
from infer_server.messages import Code, ImageOutcome, ImageRef
from infer_server.stage.worker import limit_threads

MAX_IMAGES = 256
MAX_BODY_BYTES = 512 * 1024 * 1024  # base64 of the product's 256 MiB batch limit, plus JSON
CHUNK_TIMEOUT_S = 120.0

_pipeline: Any = None  # the worker process's pipeline
_ready_barrier: Any = None


def _init_worker(repo: str, batch_size: int, null_model: bool, barrier: Any) -> None:
    """Worker process setup: thread limits, then the pipeline, as ``infer_server.stage.worker`` does."""
    global _pipeline, _ready_barrier
    limit_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from infer_server.settings import ServerSettings
    from infer_server.stage.pipeline import NullPipeline, VisionPipeline

    options = ServerSettings(batch_size=batch_size, null_model=null_model).worker_options()
    if null_model:
        _pipeline = NullPipeline(options, worker_id=os.getpid())
    else:
        _pipeline = VisionPipeline.load(repo, options, worker_id=os.getpid())
    _pipeline.warm_up()
    _ready_barrier = barrier


def _wait_all_ready() -> int:
    """Blocks until every worker runs it: submitted once per worker, it proves all are set up."""
    _ready_barrier.wait(timeout=240)
    return os.getpid()


def _run_chunk(batch_id: str, images: list[tuple[int, str, bytes]]) -> list[ImageOutcome]:
    refs = [(ImageRef(index, 0, len(data), name), data) for index, name, data in images]
    return list(_pipeline.process(batch_id, refs))


def outcome_to_json(o: ImageOutcome) -> dict[str, Any]:
    return {
        "index": o.index,
        "name": o.name,
        "status": {"code": int(o.code), "message": o.message},
        "width": o.width,
        "height": o.height,
        "detections": [
            {
                "class_id": d.class_id,
                "label": d.label,
                "score": d.score,
                "box": {"x1": d.box.x1, "y1": d.box.y1, "x2": d.box.x2, "y2": d.box.y2},
                "attributes": {a.model: {"label": a.label, "score": a.score} for a in d.attributes},
            }
            for d in o.detections
        ],
        "timings_ms": dict(o.timings_ms),
        "worker": o.worker,
    }


class BaselineServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], pool: ProcessPoolExecutor, batch_size: int) -> None:
        super().__init__(address, InferHandler)
        self.pool, self.batch_size = pool, batch_size


class InferHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client, like a gRPC channel
    server: BaselineServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """No access log: a line per request would be part of what is measured."""

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._reply(200, {"status": "SERVING"})
        else:
            self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        if self.path != "/v1/infer":
            self._reply(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY_BYTES:
            self._reply(413, {"error": "body missing or too large"})
            return
        body = self.rfile.read(length)
        try:
            request = json.loads(body)
            images = [
                (i, str(img.get("name", "")), base64.b64decode(img["data"], validate=True))
                for i, img in enumerate(request["images"])
            ]
        except (ValueError, KeyError, TypeError, binascii.Error):
            self._reply(400, {"error": "expected {'images': [{'name': str, 'data': base64}]}"})
            return
        if not 0 < len(images) <= MAX_IMAGES:
            self._reply(400, {"error": f"a request holds 1..{MAX_IMAGES} images"})
            return
        batch_id, size = uuid.uuid4().hex, self.server.batch_size
        futures: list[Future[list[ImageOutcome]]] = [
            self.server.pool.submit(_run_chunk, batch_id, images[lo : lo + size]) for lo in range(0, len(images), size)
        ]
        results: list[dict[str, Any]] = []
        for lo, future in zip(range(0, len(images), size), futures, strict=True):
            try:
                results += [outcome_to_json(o) for o in future.result(timeout=CHUNK_TIMEOUT_S)]
            except Exception:  # a worker died or timed out: every image of the chunk fails, as in the product
                results += [
                    outcome_to_json(
                        ImageOutcome.failed(batch_id, ImageRef(i, 0, 0, n), Code.UNAVAILABLE, "worker failed")
                    )
                    for i, n, _ in images[lo : lo + size]
                ]
        self._reply(200, {"results": sorted(results, key=lambda r: r["index"])})

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--null-model", action="store_true", help="read and header-check only; run no model")
    args = parser.parse_args()

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(args.workers)
    pool = ProcessPoolExecutor(
        args.workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(str(args.models), args.batch_size, args.null_model, barrier),
    )
    pids = {f.result() for f in [pool.submit(_wait_all_ready) for _ in range(args.workers)]}
    assert len(pids) == args.workers
    httpd = BaselineServer((args.host, args.port), pool, args.batch_size)
    # serve_forever() runs on this thread, and shutdown() waits for it: call it from another one.
    stop = lambda *_: threading.Thread(target=httpd.shutdown, daemon=True).start()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"listening on {args.host}:{httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    finally:
        httpd.server_close()
        pool.shutdown(wait=True, cancel_futures=True)


if __name__ == "__main__":
    main()
