"""Load generation: K concurrent client processes for a while, measured in windows until stable.

Runs in the benchmark's process; ``benchmarks.fps`` calls :func:`run_point` once per
(server, transport, concurrency). The clients themselves are processes running
``benchmarks.clients.run_client`` (the real ``InferClient``, or the REST baseline's client), forked
from a forkserver so that starting sixteen of them takes milliseconds. Every point starts with all
clients connected and pushing for ``warmup_s``; nothing of the warm-up is counted.

Windows: the rate is measured in windows of ``window_s`` from the clients' shared arrival counters;
the point ends when three consecutive windows agree within 10% (max ≤ 1.1 × min) and at least
``min_s`` passed, or after ``max_s``. Throughput is the images whose result arrived within the last
three windows; latencies are those of every batch that finished after the warm-up: per batch (push
→ last result) and per image (push → that result). CPU seconds of the server's front, its workers
and the client processes are read at every window boundary, so the cost per image of each is known
for exactly the windows the throughput comes from; so is the machine's total busy time, whose rest
(``other_cores``) shows when something outside the benchmark took CPU and the point is not clean.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import clients
from benchmarks.clients import BatchRecord, ClientSpec
from benchmarks.servers import cpu_seconds, machine_busy_seconds
from engines.scenes import generate_scene

SCENE_SEED = 2026  # fixed: every run, every transport pushes the same bytes
STABLE_WINDOWS, STABLE_SPREAD = 3, 1.10
START_TIMEOUT_S = 180.0  # clients ready (spawned, connected) before a point counts as failed
_CTX = multiprocessing.get_context("forkserver")
# The forkserver imports the client module once; each client is then a cheap fork of it, with no
# gRPC channel or thread of this process inherited.
_CTX.set_forkserver_preload(["benchmarks.clients"])


@dataclass(frozen=True)
class Workload:
    """Pre-built pushes of ``batch`` encoded scenes each, in a file the client processes read."""

    batches: list[list[bytes]]
    path: Path

    @property
    def mean_image_bytes(self) -> float:
        return float(np.mean([len(b) for batch in self.batches for b in batch]))

    @property
    def images(self) -> list[bytes]:
        return [b for batch in self.batches for b in batch]


def make_workload(scenes: int, batch: int, directory: Path, width: int = 1280, height: int = 720) -> Workload:
    """``scenes`` fixed-seed scenes, as ``scenes`` batches of ``batch`` (rotating through them)."""
    images = [generate_scene(SCENE_SEED + i, width=width, height=height).jpeg for i in range(scenes)]
    batches = [[images[(j * batch + k) % scenes] for k in range(batch)] for j in range(scenes)]
    fd, name = tempfile.mkstemp(prefix="workload-", suffix=".bin", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write("\n".join(" ".join(str(len(b)) for b in bs) for bs in batches).encode() + b"\n\n")
        for bs in batches:
            f.writelines(bs)
    return Workload(batches, Path(name))


@dataclass
class PointResult:
    """One measured point: throughput, latency, per-image stage timings and CPU cost."""

    concurrency: int
    mode: str  # "closed" or "paced"
    offered_fps: float | None
    fps: float
    windows_fps: list[float]
    stable: bool
    images: int
    errors: int
    failure: str  # the first RPC failure a client saw, if any
    batch_ms: np.ndarray
    image_ms: np.ndarray
    stage_ms: dict[str, float]  # mean per OK image, from the server's timings_ms
    labels_per_image: dict[str, float]  # mean detections per OK image, by label
    cpu_ms_per_image: dict[str, float]  # front / workers / client
    cpu_utilisation: float  # CPU seconds of all three per wall second
    other_cores: float  # CPU seconds per wall second of every other process on the machine

    def percentile(self, which: str, q: float) -> float:
        values = self.batch_ms if which == "batch" else self.image_ms
        return float(np.percentile(values, q)) if len(values) else float("nan")


Accounting = Callable[[], dict[str, float]]


def run_point(
    workload: Workload, transport: str, address: str, shm_dir: str, concurrency: int, *, window_s: float,
    max_s: float, warmup_s: float, accounting: Accounting, rate_images: float | None = None, min_s: float = 0.0,
    batches_per_window: int = 10, max_window_s: float = 5.0,
) -> PointResult:  # fmt: skip
    """Drive ``concurrency`` client processes; closed loop, or ``rate_images`` images/s on a schedule.

    ``accounting`` returns the server's CPU seconds so far (``front``, ``workers``); the clients'
    are added here. A batch's images arrive together, so a window holding few batches is noisy by a
    whole batch: after the first window, windows are stretched (up to ``max_window_s``) to hold
    about ``batches_per_window`` batches at the rate seen so far.
    """
    batch = len(workload.batches[0])
    interval = batch / rate_images if rate_images else None
    counters = [_CTX.RawValue("q", 0) for _ in range(concurrency)]
    origin = _CTX.RawValue("d", 0.0)
    ready, go, stop, out = _CTX.Semaphore(0), _CTX.Event(), _CTX.Event(), _CTX.Queue()
    procs = []
    for i in range(concurrency):
        spec = ClientSpec(i, concurrency, transport, address, shm_dir, str(workload.path), interval)
        procs.append(_CTX.Process(target=clients.run_client, args=(spec, counters[i], origin, ready, go, stop, out),
                                  name=f"bench-client-{i}", daemon=True))  # fmt: skip
    for p in procs:
        p.start()

    def cpu() -> dict[str, float]:
        client_cpu = sum(cpu_seconds(p.pid) for p in procs if p.pid is not None)
        return accounting() | {"client": client_cpu, "machine": machine_busy_seconds()}

    def arrived() -> int:
        return sum(c.value for c in counters)

    results: dict[int, tuple[list[BatchRecord], str]] = {}
    try:
        started = time.monotonic()
        for _ in procs:  # a loaded machine may take minutes to import grpc and numpy in K processes
            while not ready.acquire(timeout=1.0):
                if any(p.exitcode is not None for p in procs):
                    raise RuntimeError("a client process exited before it was ready")
                if time.monotonic() - started > START_TIMEOUT_S:
                    raise RuntimeError(f"client processes did not start within {START_TIMEOUT_S:.0f} s")
        origin.value = time.perf_counter() + 0.01  # the schedule's time zero, read after ``go``
        go.set()
        time.sleep(warmup_s)
        bounds, marks, counts = [time.perf_counter()], [cpu()], [arrived()]
        windows: list[float] = []
        length = window_s
        while True:
            time.sleep(length)
            bounds.append(time.perf_counter())
            marks.append(cpu())
            counts.append(arrived())
            windows.append((counts[-1] - counts[-2]) / (bounds[-1] - bounds[-2]))
            rate = max(windows[-1], 1e-3)
            length = min(max(window_s, batches_per_window * batch / rate), max_window_s)
            if any(not p.is_alive() for p in procs):
                raise RuntimeError("a client process died")
            last = windows[-STABLE_WINDOWS:]
            stable = len(last) == STABLE_WINDOWS and max(last) <= STABLE_SPREAD * max(min(last), 1e-9)
            elapsed = bounds[-1] - bounds[0]
            if (stable and elapsed >= min_s) or elapsed >= max_s:
                break
    finally:
        stop.set()
        go.set()
        deadline = time.monotonic() + 180
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                index, records, failure = out.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    break  # every client has exited: nothing more will come
                continue
            results[index] = (records, failure)
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    failures = [f for _, f in results.values() if f]
    n = min(STABLE_WINDOWS, len(windows))
    lo, hi = bounds[-1 - n], bounds[-1]
    images = counts[-1] - counts[-1 - n]
    cpu_used = {k: marks[-1][k] - marks[-1 - n][k] for k in marks[-1]}
    # Whatever else ran meanwhile (another job, this process's bookkeeping): it took cores from the point.
    other = cpu_used.pop("machine") - sum(cpu_used.values())
    records = [r for recs, _ in results.values() for r in recs if bounds[0] <= r.end < hi]
    return PointResult(
        concurrency=concurrency,
        mode="closed" if rate_images is None else "paced",
        offered_fps=rate_images,
        fps=images / (hi - lo),
        windows_fps=windows,
        stable=stable,
        images=images,
        errors=sum(r.errors for r in records),
        failure=failures[0] if failures else "",
        batch_ms=np.array([(r.end - r.start) * 1e3 for r in records if not r.errors]),
        image_ms=np.array([(a - r.start) * 1e3 for r in records for a in r.arrivals]),
        stage_ms=_mean_stages([t for r in records for t in r.timings]),
        labels_per_image=_labels_per_image([ls for r in records for ls in r.labels]),
        cpu_ms_per_image={k: v * 1e3 / max(images, 1) for k, v in cpu_used.items()},
        cpu_utilisation=sum(cpu_used.values()) / (hi - lo),
        other_cores=max(other, 0.0) / (hi - lo),
    )


def _mean_stages(timings: list[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, float] = collections.defaultdict(float)
    for t in timings:
        for stage, ms in t.items():
            sums[stage] += ms
    return {stage: total / len(timings) for stage, total in sums.items()} if timings else {}


def _labels_per_image(labels: list[tuple[str, ...]]) -> dict[str, float]:
    counts = collections.Counter(label for image in labels for label in image)
    return {label: n / len(labels) for label, n in sorted(counts.items())} if labels else {}
