"""What this machine could possibly do for one configuration, measured in the same run as the server.

Called by ``benchmarks.fps`` before a server is started, so nothing else competes for the cores.
Three bounds, each on every core at once (one process per core with one thread per library, like
the server's stage workers, so shared caches and memory bandwidth are part of the measurement):

* **decode-only**: ``infer_server.stage.preprocess.DetectorPreprocessor`` (DALI decode + resize +
  normalise) on the benchmark's scenes at the served batch size; images/s over all cores.
* **model-only**: the engines alone (``infer_server.stage.backends.create_engine``) on pre-decoded
  tensors: the detector at the served batch size, each classifier on a batch of real crops. Costs
  are ms per image (detector) and per crop (classifier); :func:`model_only_fps` turns them into
  images/s with the detections per image the server actually produced in the run.
* **CPU-time bound** (:func:`cpu_bound`): cores / the pipeline's CPU cost per image: the sum of
  the per-stage ``timings_ms`` the server returns, or the workers' CPU per image from /proc where
  that is lower (preemption inflates a stage's wall time, not its CPU). ``benchmarks.fps`` takes
  both from the saturated point whose rate it is compared with. The end-to-end rate over it says how
  much everything else (gRPC front, queues, clients, idle cores) costs.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infer_server.messages import STAGES


@dataclass(frozen=True)
class Bounds:
    decode_fps: float  # all cores
    detector_ms_per_image: float  # one core, while every core runs the same
    classifier_ms_per_crop: dict[str, float]
    classifier_applies_to: dict[str, list[str] | None]
    cores: int
    batch: int
    crop_batch: int


def _measure(
    repo_dir: str, jpegs: list[bytes], batch: int, crop_batch: int, seconds: float, barrier: Any, out: Any
) -> None:
    """One process of :func:`measure_bounds` (spawn target): decode loop, then each engine's loop."""
    from infer_server.stage.worker import limit_threads

    limit_threads(1)
    import numpy as np

    from infer_server.stage.backends import create_engine
    from infer_server.stage.model_repo import ModelRepository
    from infer_server.stage.preprocess import CropPreprocessor, DetectorPreprocessor

    repo = ModelRepository.load(repo_dir)
    det = repo.detector.config
    pre = DetectorPreprocessor(det.input, batch_size=batch)
    chunks = [[jpegs[(j + k) % len(jpegs)] for k in range(batch)] for j in range(0, len(jpegs), batch)]
    # Inputs are copied out at once: DALI reuses its output buffers on the next run.
    first = pre.run(chunks[0])
    feeds = {det.name: (det.input.name, np.array(first.tensor), batch)}
    # Crops of real image regions: a 4×3 grid of boxes over the chunk's decoded images.
    w, h = first.sizes[0]
    boxes = np.array([[x, y, x + w / 4, y + h / 3] for y in (0, h / 3, 2 * h / 3) for x in np.arange(4) * w / 4])
    owners = np.arange(crop_batch) % len(first.originals)
    grid = boxes[np.arange(crop_batch) % len(boxes)]
    for entry in repo.classifiers:
        cfg = entry.config
        crops = CropPreprocessor(
            cfg.input, source_color=det.input.color, padding=cfg.crop_padding, batch_size=crop_batch
        )
        (_, tensor), *_ = crops.batches(first.originals, first.sizes, owners, grid)
        feeds[cfg.name] = (cfg.input.name, np.array(tensor), crop_batch)
    engines = {
        e.config.name: create_engine(e.onnx_path, "cpu", intra_op_num_threads=1)
        for e in (repo.detector, *repo.classifiers)
    }
    for name, engine in engines.items():  # first runs allocate and pick kernels
        engine.infer({feeds[name][0]: feeds[name][1]})

    barrier.wait()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds or n < 2:
        pre.run(chunks[n % len(chunks)])
        n += 1
    decode_fps = n * batch / (time.perf_counter() - t0)

    per_model = max(seconds / len(engines), 0.5)
    costs = {}
    for name, engine in engines.items():
        barrier.wait()  # every core runs the same model at the same time
        input_name, tensor, items = feeds[name]
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < per_model or n < 3:
            engine.infer({input_name: tensor})
            n += 1
        costs[name] = (time.perf_counter() - t0) * 1e3 / (n * items)
    out.put((decode_fps, costs))


def measure_bounds(
    repo_dir: Path, jpegs: Sequence[bytes], *, cores: int, batch: int, crop_batch: int = 32, seconds: float = 3.0
) -> Bounds:
    """Decode-only throughput and engine costs, one process per core, all running at once."""
    from infer_server.stage.model_repo import ModelRepository

    repo = ModelRepository.load(repo_dir)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(cores), ctx.Queue()
    args = (str(repo_dir), list(jpegs), batch, crop_batch, seconds, barrier, out)
    procs = [ctx.Process(target=_measure, args=args, name=f"bounds-{i}", daemon=True) for i in range(cores)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=300) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    names = results[0][1].keys()
    costs = {name: sum(r[1][name] for r in results) / len(results) for name in names}
    det_name = repo.detector.config.name
    return Bounds(
        decode_fps=sum(r[0] for r in results),
        detector_ms_per_image=costs[det_name],
        classifier_ms_per_crop={e.config.name: costs[e.config.name] for e in repo.classifiers},
        classifier_applies_to={e.config.name: e.config.applies_to for e in repo.classifiers},
        cores=cores,
        batch=batch,
        crop_batch=crop_batch,
    )


def crops_per_image(bounds: Bounds, labels_per_image: Mapping[str, float]) -> dict[str, float]:
    """Crops each classifier sees per image, from the detections per image by label."""
    return {
        name: sum(n for label, n in labels_per_image.items() if applies is None or label in applies)
        for name, applies in bounds.classifier_applies_to.items()
    }


def model_only_fps(bounds: Bounds, labels_per_image: Mapping[str, float]) -> float:
    """Images/s of the engines alone on every core, with the run's detections per image."""
    crops = crops_per_image(bounds, labels_per_image)
    ms = bounds.detector_ms_per_image + sum(crops[n] * c for n, c in bounds.classifier_ms_per_crop.items())
    return bounds.cores * 1e3 / ms


@dataclass(frozen=True)
class CpuBound:
    fps: float
    cost_ms: float  # CPU per image the bound assumes
    source: str  # "stage timings" or "workers' CPU (/proc)"
    stages: dict[str, float]


def cpu_bound(stage_ms: Mapping[str, float], workers_cpu_ms: float | None, cores: int) -> CpuBound:
    """cores / the pipeline's CPU cost per image.

    The cost is the sum of the stages a worker runs (``queue`` is waiting, not work). Under load a
    stage's wall time also counts the moments its worker was preempted, so when the workers' own
    CPU time per image (from /proc, same windows) is lower, that is the cost: a stage cannot have
    used more CPU than the process that ran it.
    """
    stages = {stage: stage_ms.get(stage, 0.0) for stage in STAGES}
    total, source = sum(stages.values()), "stage timings"
    if workers_cpu_ms is not None and 0 < workers_cpu_ms < total:
        total, source = workers_cpu_ms, "workers' CPU (/proc)"
    return CpuBound(cores * 1e3 / total if total > 0 else float("nan"), total, source, stages)
