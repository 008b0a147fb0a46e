"""One simulated client application: a process that pushes batches and waits for their results.

Runs in a client process (``benchmarks.loadgen`` forks them from a forkserver that imported only
this module, so a start costs milliseconds and the process holds no gRPC state of the parent's).
Processes rather than threads: same-host clients are separate applications, and K threads in one
Python process would share one GIL and make the load generator, not the server, the bottleneck of
a fast data path.

A client uses the real ``InferClient`` for the gRPC transports (``tmpfs``: PushData path,
``inline``: PushData data) or ``RestClient`` for the REST baseline. It pushes closed loop (the next
batch once every result of the last one arrived) or on its slots of a fixed schedule (open loop;
the start of a batch is its *scheduled* time, so queueing a slow server causes is not hidden). It
counts every arriving image in a shared counter (the parent reads those at window boundaries) and
sends its batch records to the parent when stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from infer_proto.grpc_io import prefer_epoll_io

# Same-host client applications are told to run gRPC on its epoll I/O path, like the server does
# (infer_proto/grpc_io.py): before grpc is imported. Imported by the benchmark itself (via loadgen)
# and by the forkserver every client is forked from, so the whole benchmark process tree gets it.
prefer_epoll_io()

from benchmarks.baselines.rest_client import RestClient  # noqa: E402
from infer_client import Credentials, InferClient  # noqa: E402


@dataclass
class BatchRecord:
    """One push as the client saw it (``time.perf_counter``: CLOCK_MONOTONIC, shared by processes)."""

    start: float
    end: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    timings: list[dict[str, float]] = field(default_factory=list)  # per OK image: the server's timings_ms
    labels: list[tuple[str, ...]] = field(default_factory=list)  # per OK image: labels of its detections
    errors: int = 0  # images answered with an error, or every unanswered image of a failed request


@dataclass(frozen=True)
class ClientSpec:
    """What one client process is told (picklable)."""

    index: int
    count: int  # clients in this point: batches are interleaved across them
    transport: str  # tmpfs | inline | rest | local:SOCKET (tmpfs, the session on the server's local socket)
    address: str
    shm_dir: str
    workload: str  # the file ``loadgen.make_workload`` wrote
    interval: float | None  # seconds between scheduled batches over all clients; None = closed loop


class Driver(Protocol):
    def run_batch(self, images: list[bytes], names: list[str], record: BatchRecord, counter: Any) -> None: ...

    def close(self) -> None: ...


class GrpcDriver:
    """The client library's fast path: one ``Session`` stream per client, a push and its results on it."""

    def __init__(self, address: str, transport: str, shm_dir: str) -> None:
        credentials = Credentials.from_env()  # INFER_TOKEN, set by ``fps --tokens``
        local = transport.removeprefix("local:") if transport.startswith("local:") else None  # tmpfs, local socket
        self.client = InferClient(address, shm_dir=shm_dir, transport="tmpfs" if local else transport,  # type: ignore[arg-type]
                                  credentials=credentials, local_socket=local)  # fmt: skip
        self.session = self.client.session()

    def run_batch(self, images: list[bytes], names: list[str], record: BatchRecord, counter: Any) -> None:
        if self.session.broken:  # e.g. the server restarted under an external --server run
            self.session = self.client.session()
        batch_id = self.session.push(images, names, defer_answer=True)  # answered with its results
        for result in self.session.results(batch_id):
            record.arrivals.append(time.perf_counter())
            counter.value += 1
            if result.ok:
                record.timings.append(dict(result.timings_ms))
                record.labels.append(tuple(d.label for d in result.detections))
            else:
                record.errors += 1

    def close(self) -> None:
        self.session.close()
        self.client.close()


class RestDriver:
    def __init__(self, address: str) -> None:
        self.client = RestClient(address)

    def run_batch(self, images: list[bytes], names: list[str], record: BatchRecord, counter: Any) -> None:
        results = self.client.infer(images, names)
        now = time.perf_counter()  # one response carries every result: they all arrive together
        counter.value += len(results)
        for result in results:
            record.arrivals.append(now)
            if result["status"]["code"] == 0:
                record.timings.append(result["timings_ms"])
                record.labels.append(tuple(d["label"] for d in result["detections"]))
            else:
                record.errors += 1

    def close(self) -> None:
        self.client.close()


def load_workload(path: str) -> list[tuple[list[bytes], list[str]]]:
    """The batches ``loadgen.make_workload`` wrote: a line of sizes per batch, a blank line, the bytes."""
    raw = Path(path).read_bytes()
    header, body = raw.split(b"\n\n", 1)
    batches, offset = [], 0
    for line in header.decode().splitlines():
        sizes = [int(v) for v in line.split()]
        images = []
        for size in sizes:
            images.append(body[offset : offset + size])
            offset += size
        batches.append((images, [f"img-{i}" for i in range(len(images))]))
    return batches


def run_client(spec: ClientSpec, counter: Any, origin: Any, ready: Any, go: Any, stop: Any, out: Any) -> None:
    """Process target: connect, say ready, push until stopped, then send the records back.

    ``counter`` (this client's arrivals) and ``origin`` (the schedule's time zero) are shared
    values; ``ready`` a semaphore released once connected; ``go`` and ``stop`` events.
    """
    batches = load_workload(spec.workload)
    driver: Driver = RestDriver(spec.address) if spec.transport == "rest" else GrpcDriver(
        spec.address, spec.transport, spec.shm_dir
    )  # fmt: skip
    records: list[BatchRecord] = []
    failure = ""
    try:
        ready.release()
        go.wait()
        n = 0
        while not stop.is_set():
            slot = spec.index + n * spec.count
            if spec.interval is not None:
                start = origin.value + slot * spec.interval
                if stop.wait(max(0.0, start - time.perf_counter())):
                    break
            else:
                start = time.perf_counter()
            images, names = batches[slot % len(batches)]
            record = BatchRecord(start)
            try:
                driver.run_batch(images, names, record, counter)
            except Exception as exc:  # an RPC failed: its unanswered images are errors, go on
                record.errors += len(images) - len(record.arrivals)
                failure = failure or f"{type(exc).__name__}: {exc}"
                time.sleep(0.05)  # do not spin on a refusing server
            record.end = time.perf_counter()
            records.append(record)
            n += 1
    finally:
        driver.close()
        out.put((spec.index, records, failure))
