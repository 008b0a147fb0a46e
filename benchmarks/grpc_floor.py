"""The floor under the data path: what Python gRPC and the worker pool cost before any of our work.

Run from the repository root::

    .venv/bin/python -m benchmarks.grpc_floor            # about 15 s

Part 1 runs an empty grpc.aio service (bytes in, bytes out, no protobuf) in a child process and a
blocking client here, and reports the CPU per call of each side for the message patterns the
product's RPCs use per batch: ``PushData`` + ``PullResult`` streaming one message per image (8),
and a ``Session`` exchange (one message in, an answer and a burst of results out, read by a
reader thread as the client library does). Part 2 drives a null-model ``PipelinePool`` directly
(no gRPC): submit a batch file of 8 scenes, wait for its 8 outcomes, two batches in flight.
CPU is read from ``/proc``/``time.process_time``; compare the numbers of one run only.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import grpc.experimental

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.loadgen import make_workload
from benchmarks.servers import REPO_ROOT, cpu_seconds
from infer_server.messages import FileRef, ImageOutcome, ImageRef

RESULT = b"r" * 150  # about one serialised ImageResult of the null model
IMAGES = 8


def _bytes(b: bytes) -> bytes:
    return b


async def _serve(port: Any) -> None:
    async def push(request: bytes, context: Any) -> bytes:
        return b"batch-id"

    async def pull(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(IMAGES):
            yield RESULT

    async def session(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for _ in requests:
            yield b"answer"
            yield RESULT * IMAGES

    handler = grpc.method_handlers_generic_handler("floor.Floor", {
        "Push": grpc.unary_unary_rpc_method_handler(push, _bytes, _bytes),
        "Pull": grpc.unary_stream_rpc_method_handler(pull, _bytes, _bytes),
        "Session": grpc.stream_stream_rpc_method_handler(session, _bytes, _bytes),
    })  # fmt: skip
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port.value = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await server.wait_for_termination()


def _server_main(port: Any) -> None:
    asyncio.run(_serve(port))


def _measure(label: str, server_pid: int, once: Callable[[], None], n: int) -> None:
    for _ in range(n // 10):  # warm-up
        once()
    c0, s0 = time.process_time(), cpu_seconds(server_pid)
    for _ in range(n):
        once()
    c1, s1 = time.process_time(), cpu_seconds(server_pid)
    print(f"  {label:46s} client {1e3 * (c1 - c0) / n:5.2f} ms   server {1e3 * (s1 - s0) / n:5.2f} ms per batch")


def grpc_floor(n: int) -> None:
    ctx = multiprocessing.get_context("spawn")
    port = ctx.Value("i", 0)
    server = ctx.Process(target=_server_main, args=(port,), daemon=True)
    server.start()
    while port.value == 0:
        time.sleep(0.05)
    target = f"127.0.0.1:{port.value}"
    options = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
    with grpc.insecure_channel(target, options=options) as channel, grpc.insecure_channel(target) as bidi:
        push = channel.unary_unary("/floor.Floor/Push", _bytes, _bytes)
        pull = channel.unary_stream("/floor.Floor/Pull", _bytes, _bytes)
        print(f"gRPC alone, batches of {IMAGES} (empty service, no protobuf):")
        _measure("PushData + PullResult (a message per image)", server.pid, lambda: (push(b"p"), list(pull(b"q"))), n)

        requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = bidi.stream_stream("/floor.Floor/Session", _bytes, _bytes)(iter(requests.get, None))
        changed, replies = threading.Condition(), [0]

        def read() -> None:
            with contextlib.suppress(grpc.RpcError):  # cancelled when the channel closes
                for _ in call:
                    with changed:
                        replies[0] += 1
                        changed.notify_all()

        threading.Thread(target=read, daemon=True).start()

        def exchange() -> None:
            with changed:
                want = replies[0] + 2
            requests.put(b"p" * 300)
            with changed:
                changed.wait_for(lambda: replies[0] >= want)

        _measure("Session (1 in; answer + burst out)", server.pid, exchange, n)
        requests.put(None)
    server.kill()


def pool_floor(n: int) -> None:
    from infer_server.settings import ServerSettings
    from infer_server.supervisor.pool import PipelinePool

    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        images = make_workload(IMAGES, IMAGES, Path(tmp)).batches[0]
        path = Path(tmp) / "batch"
        path.write_bytes(b"".join(images))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # held as the front holds a validated file
        st = os.fstat(fd)
        file = FileRef(str(path), st.st_dev, st.st_ino, st.st_size, fd)
        refs, offset = [], 0
        for i, image in enumerate(images):
            refs.append(ImageRef(i, offset, len(image), f"img{i}"))
            offset += len(image)
        done, changed = [0], threading.Condition()

        def on_outcome(outcome: ImageOutcome) -> None:
            with changed:
                done[0] += 1
                changed.notify_all()

        loop = asyncio.new_event_loop()  # the server's loop: it reads the workers' pipes
        threading.Thread(target=loop.run_forever, daemon=True).start()
        options = ServerSettings(batch_size=IMAGES, null_model=True).worker_options()
        pool = PipelinePool(REPO_ROOT / "engines" / "models", options, workers=2, max_attempts=2, loop=loop,
                            on_outcome=on_outcome)  # fmt: skip
        pool.start()
        workers = [p.pid for p in multiprocessing.active_children() if p.name.startswith("infer-worker-")]
        submitted = 0

        def batch() -> None:
            nonlocal submitted
            with changed:  # two batches in flight
                changed.wait_for(lambda: done[0] >= (submitted - 1) * IMAGES)
            pool.submit_batch(f"b{submitted}", file, refs, time.monotonic() + 60)
            submitted += 1

        for _ in range(n // 10):
            batch()
        c0, w0 = time.process_time(), sum(cpu_seconds(p) for p in workers)
        for _ in range(n):
            batch()
        with changed:
            changed.wait_for(lambda: done[0] >= submitted * IMAGES)
        c1, w1 = time.process_time(), sum(cpu_seconds(p) for p in workers)
        pool.stop()
        loop.call_soon_threadsafe(loop.stop)
    print(f"worker pool alone, null model, batches of {IMAGES} (no gRPC):")
    front, work = 1e3 * (c1 - c0) / n, 1e3 * (w1 - w0) / n
    print(f"  {'submit → every outcome back':46s} front  {front:5.2f} ms   workers {work:5.2f} ms per batch")


if __name__ == "__main__":
    grpc_floor(5000)
    pool_floor(5000)
