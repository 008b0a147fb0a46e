"""Measure a model repository on held-out scenes through the server's own code path.

Images are decoded and resized by the server's DALI pipeline (``infer_server.stage.preprocess``), models
run in the server's ONNX Runtime engine, and detections come out of the server's DetectNet_v2
decode + NMS (``infer_server.stage.postprocess``) — so the numbers are what a client would get.

* detector: AP@0.5 per class and mAP (VOC all-point; don't-cares per ``engines.metrics``), plus
  precision/recall at the configured confidence threshold;
* attribute models: top-1 on ground-truth crops (cropped by the server's ROI-resize pipeline);
* throughput: images/s of each model alone at batch 1 and 8, one ONNX Runtime thread (what one
  stage worker gets per core).

``python -m engines.evaluate [--models engines/models] [--scenes 500]`` re-measures a repository
and prints the table; the recipe (``engines/package.py``) calls the functions below.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from engines.data import STYLES, SceneRef, generate, refs
from engines.metrics import DetectionTally, match_image
from engines.scenes import CLASSES, COLORS, VEHICLE_TYPES, Scene
from infer_server.stage.backends import create_engine
from infer_server.stage.model_repo import ModelConfig, ModelRepository
from infer_server.stage.pipeline import softmax
from infer_server.stage.postprocess import postprocess_detector
from infer_server.stage.preprocess import CropPreprocessor, DetectorPreprocessor

HELD_OUT_FIRST_SEED = {"default": 900_000, "varied": 910_000, "alt": 950_000}  # engines.build's held-out ranges
AP_THRESHOLD = 0.05  # score floor for the PR curve; the shipped threshold is reported separately
CHUNK = 8


@dataclass
class DecodedScenes:
    """Detector inputs and decoded originals of a scene list, decoded once and reused per model."""

    scenes: list[Scene]
    tensors: np.ndarray  # float32 [N, 3, H, W]
    originals: list[np.ndarray]  # uint8 HWC RGB


def decode_scenes(scene_refs: list[SceneRef], detector: ModelConfig) -> DecodedScenes:
    """Scenes (``engines.data.STYLES``: ``default`` and ``varied`` are trained on, ``alt`` never is)
    through the server's DALI preprocessing."""
    pre = DetectorPreprocessor(detector.input, device="cpu", batch_size=CHUNK, num_threads=2)
    styles = "+".join(sorted({style for style, _ in scene_refs}))
    scenes = [generate(r) for r in tqdm(scene_refs, desc=f"scenes ({styles} style)")]
    tensors, originals = [], []
    for i in range(0, len(scenes), CHUNK):
        out = pre.run([s.jpeg for s in scenes[i : i + CHUNK]])
        if out.errors:
            raise RuntimeError(f"scenes failed to decode: {out.errors}")
        tensors.append(np.asarray(out.tensor))
        originals.extend(np.array(o) for o in out.originals)
    return DecodedScenes(scenes, np.concatenate(tensors), originals)


class _ExactEngine:
    """The model's Q/DQ arithmetic done exactly (ONNX Runtime with ``session.disable_quant_qdq``):
    what every x86 CPU class computes up to rounding when the weights cannot saturate (see
    ``engines.int8_agreement``). Evaluating with it beside the INT8 kernels shows how far a figure
    can move between CPU classes."""

    def __init__(self, onnx_path: Path) -> None:
        from engines.int8_agreement import ort_session

        self._session = ort_session(onnx_path, exact=True)
        self._outputs = [o.name for o in self._session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, feeds), strict=True))

    def close(self) -> None:
        pass


def _engine(onnx_path: Path, exact: bool):  # noqa: ANN202 - an Engine or its exact stand-in
    return _ExactEngine(onnx_path) if exact else create_engine(onnx_path, "cpu", intra_op_num_threads=2)


def evaluate_detector(onnx_path: Path, config: ModelConfig, data: DecodedScenes,
                      threshold: float | None = None, exact: bool = False) -> dict:
    """AP per class, mAP, and precision/recall at ``threshold`` (default: the config's)."""
    assert config.decode is not None
    engine = _engine(onnx_path, exact)
    low = config.decode.model_copy(update={"confidence_threshold": AP_THRESHOLD})
    tally = DetectionTally(len(config.labels))
    cov_name, bbox_name = config.outputs["coverage"], config.outputs["bbox"]
    for i in tqdm(range(0, len(data.scenes), CHUNK), desc=f"detector {onnx_path.name}"):
        out = engine.infer({config.input.name: data.tensors[i : i + CHUNK]})
        for k, scene in enumerate(data.scenes[i : i + CHUNK]):
            d = postprocess_detector(out[cov_name][k], out[bbox_name][k], low, input_width=config.input.width,
                                     input_height=config.input.height, image_width=scene.width,
                                     image_height=scene.height)
            gt_boxes = np.array([o.box for o in scene.objects]).reshape(-1, 4)
            gt_classes = np.array([o.class_id for o in scene.objects])
            m = match_image(gt_boxes, gt_classes, d.boxes, d.scores, d.class_ids, scene.width, scene.height)
            tally.add(m, gt_classes, d.scores, d.class_ids)
    engine.close()
    ap = tally.average_precision()
    t = threshold if threshold is not None else config.decode.thresholds(len(config.labels))[0]
    precision, recall = tally.precision_recall(t)
    return {"map50": float(np.nanmean(ap)), "ap50": {c: float(a) for c, a in zip(config.labels, ap, strict=True)},
            "threshold": t, "precision": precision, "recall": recall,
            "ground_truth_objects": int(tally.n_gt.sum()), "_tally": tally}


def best_threshold(tally: DetectionTally) -> float:
    """The confidence threshold maximising F1 on a validation tally."""
    best, best_f1 = 0.5, -1.0
    for t in np.arange(0.2, 0.91, 0.025):
        p, r = tally.precision_recall(float(t))
        f1 = 2 * p * r / max(p + r, 1e-9)
        if f1 > best_f1:
            best, best_f1 = float(t), f1
    return round(best, 3)


def evaluate_classifier(onnx_path: Path, config: ModelConfig, data: DecodedScenes, exact: bool = False) -> dict:
    """Top-1 on ground-truth boxes of the classes the model applies to."""
    labels = {"color": COLORS, "vehicle_type": VEHICLE_TYPES}[config.name]
    attr = "color" if config.name == "color" else "vehicle_type"
    applies = set(config.applies_to or CLASSES)
    owners, boxes, truth = [], [], []
    for i, scene in enumerate(data.scenes):
        for o in scene.objects:
            if o.label in applies:
                owners.append(i)
                boxes.append(o.box)
                truth.append(labels.index(getattr(o, attr)))
    sizes = [(s.width, s.height) for s in data.scenes]
    crops = CropPreprocessor(config.input, padding=config.crop_padding, batch_size=64, num_threads=2)
    engine = _engine(onnx_path, exact)
    out_name = config.outputs.get("logits") or config.outputs["probabilities"]
    pred = np.zeros(len(truth), np.int64)
    for rows, tensor in crops.batches(data.originals, sizes, np.array(owners), np.array(boxes, np.float32)):
        pred[rows] = softmax(engine.infer({config.input.name: tensor})[out_name]).argmax(1)
    engine.close()
    return {"top1": float(np.mean(pred == np.array(truth))), "crops": len(truth)}


def throughput(onnx_paths: dict[str, Path], input_shape: tuple[int, int, int], batches: tuple[int, ...] = (1, 8),
               rounds: int = 5, seconds: float = 1.0) -> dict[str, dict[str, float]]:
    """Images/s per model and batch size, one ORT thread, models measured interleaved round by round
    (so a busy neighbour slows all of them alike); the median round counts."""
    engines = {k: create_engine(p, "cpu", intra_op_num_threads=1) for k, p in onnx_paths.items()}
    rng = np.random.default_rng(0)
    samples: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in engines}
    for _ in range(rounds):
        for b in batches:
            x = rng.random((b, *input_shape), dtype=np.float32)
            for name, eng in engines.items():
                feeds = {eng.inputs[0].name: x}
                eng.infer(feeds)  # warm
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    eng.infer(feeds)
                    n += b
                samples[name][b].append(n / (time.perf_counter() - t0))
    for eng in engines.values():
        eng.close()
    return {k: {f"batch{b}_ips": round(float(np.median(v)), 2) for b, v in per.items()} for k, per in samples.items()}


def main() -> None:
    p = argparse.ArgumentParser(description="Re-measure a model repository on held-out scenes.")
    p.add_argument("--models", type=Path, default=Path(__file__).parent / "models")
    p.add_argument("--scenes", type=int, default=500)
    p.add_argument("--seed", type=int, default=None,
                   help="first held-out seed (default: the recipe's, 900000 for default, 950000 for alt)")
    p.add_argument("--style", choices=sorted(STYLES), default="default",
                   help="scene style: default or varied (the training styles) or alt (a style never trained on)")
    p.add_argument("--exact", action="store_true",
                   help="run the exact Q/DQ arithmetic instead of this CPU's INT8 kernels (cross-CPU comparison)")
    p.add_argument("--no-throughput", action="store_true", help="accuracy only")
    args = p.parse_args()
    repo = ModelRepository.load(args.models)
    first = args.seed if args.seed is not None else HELD_OUT_FIRST_SEED[args.style]
    data = decode_scenes(refs(args.style, range(first, first + args.scenes)), repo.detector.config)
    report: dict = {"detector": evaluate_detector(repo.detector.onnx_path, repo.detector.config, data,
                                                  exact=args.exact)}
    report["detector"].pop("_tally")
    for c in repo.classifiers:
        report[c.config.name] = evaluate_classifier(c.onnx_path, c.config, data, exact=args.exact)
    if args.no_throughput:
        print(json.dumps(report, indent=1))
        return
    det_in = repo.detector.config.input
    report["throughput"] = throughput({"detector": repo.detector.onnx_path}, (3, det_in.height, det_in.width))
    for c in repo.classifiers:
        ci = c.config.input
        report["throughput"].update(throughput({c.config.name: c.onnx_path}, (3, ci.height, ci.width)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
