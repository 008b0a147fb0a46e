"""The vision pipeline of one stage worker: encoded images of a chunk in, one ImageOutcome each out.

Built once per worker process by ``infer_server.stage.worker`` (its ``setup``) and called for every
``WorkItem``; it never sees files, queues or other processes, so it can also be driven directly
(tests, benchmarks). Stages, each timed and reported as every image's share:

    header checks → ``decode`` (DALI: decode, resize, normalise) → ``detector`` engine →
    ``postprocess`` (DetectNet_v2 decode + NMS) → ``crop`` (DALI ROI resize per box and
    classifier) → ``attributes`` (each classifier on the crops routed to it, softmax, argmax)

Everything model specific — input names and sizes, output names, labels, thresholds, routing — is
read from the model repository's configs.

``NullPipeline`` is the same interface with no model (``infer-server serve --null-model``): each
image's bytes are still read and its header checked, nothing is decoded or run. It measures the data
path alone (tmpfs handoff, queues, result stream), which is what ``benchmarks/fps.py`` compares.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from infer_server.messages import AttributeRecord, Box, Code, DetectionRecord, ImageOutcome, ImageRef, WorkerOptions
from infer_server.stage.backends import Engine, create_engine
from infer_server.stage.model_repo import ModelEntry, ModelRepository
from infer_server.stage.postprocess import Detections, postprocess_detector
from infer_server.stage.preprocess import CropPreprocessor, DetectorPreprocessor, ImageRejected, check_image


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class _Classifier:
    """An attribute model with the crop preprocessor for its input size and padding."""

    def __init__(
        self,
        entry: ModelEntry,
        source_color: str,
        options: WorkerOptions,
    ):
        cfg = entry.config
        self.entry, self.name, self.labels = entry, cfg.name, cfg.labels
        self.input_name = cfg.input.name
        self.probabilities = "logits" not in cfg.outputs  # the model applies softmax itself
        self.output_name = cfg.outputs["logits" if "logits" in cfg.outputs else "probabilities"]
        self.engine = create_engine(
            entry.onnx_path,
            options.device,
            max_batch_size=cfg.max_batch_size,
            intra_op_num_threads=options.intra_op_threads,
            plan_cache_dir=options.plan_cache_dir,
        )
        # One DALI run per engine call: the crop batch is the model's batch limit.
        self.crops = CropPreprocessor(
            cfg.input,
            source_color=source_color,
            padding=cfg.crop_padding,
            device=options.device,
            batch_size=min(cfg.max_batch_size, 128),
        )


def rejected(batch_id: str, ref: ImageRef, reason: str, worker: int, together: int) -> ImageOutcome:
    """An image a pipeline refuses (a header check, a decode): INVALID_ARGUMENT ``image N: reason``,
    stamped with the worker and the size of the call it came in, as its answered images are."""
    return ImageOutcome(batch_id, ref.index, ref.name, Code.INVALID_ARGUMENT, f"image {ref.index}: {reason}",
                        worker=worker, batch_images=together)  # fmt: skip


class VisionPipeline:
    """The loaded models and DALI pipelines of one worker.

    From ``options``: ``batch_size`` bounds a chunk (the detector's DALI batch);
    ``max_image_pixels`` is the decoder limit checked on headers; ``intra_op_threads`` the ONNX
    Runtime threads per model; ``plan_cache_dir`` where TensorRT plans are cached (device 'gpu').
    """

    def __init__(
        self, repo: ModelRepository, options: WorkerOptions, worker_id: int = -1, beside: VisionPipeline | None = None
    ):
        det = repo.detector.config
        assert det.decode is not None  # validated by ModelConfig
        device, batch_size = options.device, options.batch_size
        if batch_size > det.max_batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the detector's max_batch_size {det.max_batch_size}")
        cv2.setNumThreads(1)  # workers are processes, one per core; cv2 must not add its own pool
        self.repo, self.worker_id, self.max_image_pixels = repo, worker_id, options.max_image_pixels
        self.decode_spec = det.decode
        self.input_spec = det.input
        self.labels = det.labels
        self._cov_name, self._bbox_name = det.outputs["coverage"], det.outputs["bbox"]
        # ``beside``: the stable pipeline of a worker that also runs a candidate; every model
        # entry the two have in common is shared (one engine, one DALI pipeline), not loaded twice.
        self._shared = beside is not None and beside.repo.detector == repo.detector
        self.detector: Engine
        self.preprocess: DetectorPreprocessor
        if beside is not None and self._shared:
            self.detector, self.preprocess = beside.detector, beside.preprocess
        else:
            self.detector = create_engine(
                repo.detector.onnx_path,
                device,
                max_batch_size=det.max_batch_size,
                intra_op_num_threads=options.intra_op_threads,
                plan_cache_dir=options.plan_cache_dir,
            )
            self.preprocess = DetectorPreprocessor(det.input, device=device, batch_size=batch_size)
        theirs = {c.entry.model_dump_json(): c for c in beside.classifiers} if beside is not None else {}
        self.classifiers: list[_Classifier] = [
            theirs.get(e.model_dump_json()) or _Classifier(e, det.input.color, options) for e in repo.classifiers
        ]
        self._own = [c for c in self.classifiers if c not in theirs.values()]
        # class id → the classifiers routed to it (positions in self.classifiers).
        by_name = {c.name: i for i, c in enumerate(self.classifiers)}
        self._routes = [[by_name[e.config.name] for e in repo.classifiers_for(label)] for label in self.labels]

    @classmethod
    def load(cls, repo_dir: str | Path, options: WorkerOptions, worker_id: int = -1) -> VisionPipeline:
        """Read the repository at ``repo_dir`` and load it with ``options`` (see the class)."""
        return cls(ModelRepository.load(repo_dir, dict(options.pins), options.unloaded), options, worker_id)

    def candidate(self, repo_dir: str | Path, options: WorkerOptions) -> VisionPipeline:
        """The pipeline with ``options.candidate``'s versions, beside this one (sharing the rest)."""
        pins = dict(options.pins) | dict(options.candidate)
        unloaded = set(options.unloaded) - set(pins)
        return VisionPipeline(ModelRepository.load(repo_dir, pins, unloaded), options, self.worker_id, beside=self)

    @property
    def models(self) -> tuple[tuple[str, str], ...]:
        entries = (self.repo.detector, *self.repo.classifiers)
        return tuple((e.config.name, e.config.version) for e in entries)

    @property
    def profile(self) -> str:
        """The detector's reference profile (``profile.json`` beside its model file), or ""."""
        path = self.repo.detector.directory / "profile.json"
        return path.read_text() if path.is_file() else ""

    def warm_up(self) -> None:
        """One pass through every stage and every model (first runs allocate and tune)."""
        w, h = self.input_spec.width, self.input_spec.height
        gradient = np.linspace(0, 255, w * h * 3, dtype=np.float32).reshape(h, w, 3).astype(np.uint8)
        ok, jpeg = cv2.imencode(".jpg", gradient)
        if not ok:
            raise RuntimeError("could not encode the warm-up image")
        list(self.process("warm-up", [(ImageRef(0, 0, len(jpeg)), jpeg.tobytes())]))
        # The detector may find nothing in a gradient: run every classifier on one box per class.
        decoded = self.preprocess.run([jpeg.tobytes()])
        n = len(self.labels)
        boxes = np.tile(np.array([[0, 0, w, h]], np.float32), (n, 1))
        whole_image = Detections(boxes, np.ones(n, np.float32), np.arange(n, dtype=np.int64))
        self._attributes(decoded.originals, decoded.sizes, [whole_image])

    def process(
        self, batch_id: str, images: Sequence[tuple[ImageRef, bytes | memoryview]], read_ms: float = 0.0,
        queue_ms: float | None = None,
    ) -> Iterator[ImageOutcome]:  # fmt: skip
        """Yield one outcome per image of a chunk (``len(images) <= batch_size``) as it is final.

        Images that fail the header check or do not decode are yielded first, as INVALID_ARGUMENT;
        the rest of the chunk goes on. If a later stage raises, what was yielded stands. Each carries
        ``batch_images`` (this call's) and, if OK, the models that answered: the worker sends it as
        it is. ``read_ms`` is the worker's time to read the chunk's bytes, ``queue_ms`` (a timing of
        OK images if given) the time the chunk waited for the worker.
        """
        good: list[tuple[ImageRef, bytes | memoryview]] = []
        together = len(images)
        for ref, data in images:
            try:
                check_image(data, self.max_image_pixels)
                good.append((ref, data))
            except ImageRejected as exc:
                yield rejected(batch_id, ref, str(exc), self.worker_id, together)
        t0 = time.perf_counter()
        batch = self.preprocess.run([data for _, data in good])
        t1 = time.perf_counter()
        for pos, reason in batch.errors.items():
            ref = good[pos][0]
            yield rejected(batch_id, ref, reason, self.worker_id, together)
        n = len(batch.ok)
        if not n:
            return
        out = self.detector.infer({self.input_spec.name: batch.tensor})
        t2 = time.perf_counter()
        sizes = batch.sizes
        dets = [self._postprocess(out[self._cov_name][k], out[self._bbox_name][k], sizes[k]) for k in range(n)]
        t3 = time.perf_counter()
        attributes, crop_ms, attr_ms = self._attributes(batch.originals, sizes, dets)
        decode_ms, detector_ms, post_ms = np.array([t1 - t0, t2 - t1, t3 - t2]) * 1e3 / n
        stats, models = batch.stats.tolist(), self.models
        for k, pos in enumerate(batch.ok):
            ref = good[pos][0]
            timings = (
                ("read", read_ms / len(images)), ("decode", decode_ms), ("detector", detector_ms),
                ("postprocess", post_ms), ("crop", crop_ms[k]), ("attributes", attr_ms[k]),
                *(() if queue_ms is None else (("queue", queue_ms),)),
            )  # fmt: skip
            yield ImageOutcome(
                batch_id=batch_id, index=ref.index, name=ref.name, width=sizes[k][0], height=sizes[k][1],
                detections=self._records(dets[k], attributes[k]),
                timings_ms=tuple((stage, float(ms)) for stage, ms in timings), worker=self.worker_id,
                models=models, input_stats=tuple(stats[k]), batch_images=together,
            )  # fmt: skip

    def _postprocess(self, coverage: np.ndarray, bbox: np.ndarray, size: tuple[int, int]) -> Detections:
        return postprocess_detector(
            coverage,
            bbox,
            self.decode_spec,
            input_width=self.input_spec.width,
            input_height=self.input_spec.height,
            image_width=size[0],
            image_height=size[1],
        )

    def _attributes(
        self, originals: list[Any], sizes: list[tuple[int, int]], dets: list[Detections]
    ) -> tuple[list[list[list[AttributeRecord]]], np.ndarray, np.ndarray]:
        """Attributes per image per detection, and each image's share of crop / classifier time (ms).

        All crops of the chunk routed to one classifier go through it together, in batches of its
        ``max_batch_size``; an image's share of a batch's time is its number of crops in it.
        """
        records: list[list[list[AttributeRecord]]] = [[[] for _ in range(len(d))] for d in dets]
        crop_ms, attr_ms = np.zeros(len(dets)), np.zeros(len(dets))
        if not any(len(d) for d in dets):
            return records, crop_ms, attr_ms
        owner = np.concatenate([np.full(len(d), k, np.int64) for k, d in enumerate(dets)])
        det_index = np.concatenate([np.arange(len(d)) for d in dets])
        boxes = np.concatenate([d.boxes for d in dets])
        classes = np.concatenate([d.class_ids for d in dets])
        for ci, clf in enumerate(self.classifiers):
            rows = np.array([r for r, c in enumerate(classes) if ci in self._routes[c]], np.int64)
            if rows.size == 0:
                continue
            t0 = time.perf_counter()
            for sl, tensor in clf.crops.batches(originals, sizes, owner[rows], boxes[rows]):
                t1 = time.perf_counter()
                scores = clf.engine.infer({clf.input_name: tensor})[clf.output_name]
                probs = scores if clf.probabilities else softmax(scores.astype(np.float64))
                best = probs.argmax(axis=1)
                t2 = time.perf_counter()
                batch_rows = rows[sl]
                counts = np.bincount(owner[batch_rows], minlength=len(dets)) / len(batch_rows)
                crop_ms += counts * (t1 - t0) * 1e3
                attr_ms += counts * (t2 - t1) * 1e3
                for r, b, p in zip(batch_rows, best, probs[np.arange(len(best)), best], strict=True):
                    records[owner[r]][det_index[r]].append(AttributeRecord(clf.name, clf.labels[b], float(p)))
                t0 = time.perf_counter()
        return records, crop_ms, attr_ms

    def _records(self, d: Detections, attributes: list[list[AttributeRecord]]) -> tuple[DetectionRecord, ...]:
        return tuple(
            DetectionRecord(
                class_id=int(c),
                label=self.labels[c],
                score=float(s),
                box=Box(*(float(v) for v in box)),
                attributes=tuple(a),
            )
            for box, s, c, a in zip(d.boxes, d.scores, d.class_ids, attributes, strict=True)
        )

    def close(self) -> None:
        """Release the engines this pipeline loaded (not those it shares with the one beside it)."""
        if not self._shared:
            self.detector.close()
        for clf in self._own:
            clf.engine.close()


class NullPipeline:
    """The data path without inference: header check only, OK with the header's size, no detections.

    Loads no model and no DALI pipeline, so a server started with it is ready in seconds. Images
    that fail the header check are still rejected, exactly as in ``VisionPipeline``.
    """

    models: tuple[tuple[str, str], ...] = ()

    def __init__(self, options: WorkerOptions, worker_id: int = -1) -> None:
        # Of the options only the pixel limit matters: device, batch size and threads mean nothing
        # without a model.
        self.max_image_pixels, self.worker_id = options.max_image_pixels, worker_id

    def warm_up(self) -> None:
        """Nothing to warm: no model is loaded."""

    def process(
        self, batch_id: str, images: Sequence[tuple[ImageRef, bytes | memoryview]], read_ms: float = 0.0,
        queue_ms: float | None = None,
    ) -> Iterator[ImageOutcome]:  # fmt: skip
        """One outcome per image, in order: rejected as ``VisionPipeline`` would, else OK and empty
        (``batch_images`` set, as ``VisionPipeline`` sets it)."""
        together = len(images)
        timings = (("read", read_ms / max(together, 1)), *(() if queue_ms is None else (("queue", queue_ms),)))
        for ref, data in images:
            try:
                header = check_image(data, self.max_image_pixels)
            except ImageRejected as exc:
                yield rejected(batch_id, ref, str(exc), self.worker_id, together)
                continue
            yield ImageOutcome(
                batch_id=batch_id, index=ref.index, name=ref.name, width=header.width, height=header.height,
                timings_ms=timings, worker=self.worker_id, batch_images=together,
            )  # fmt: skip

    def close(self) -> None:
        """Nothing to release."""
