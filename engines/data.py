"""Training data for the default models, built from ``engines.scenes`` (recipe only).

* ``SceneRef`` / ``STYLES``: a scene is named by its drawing style and seed — ``default``
  (``engines.scenes``), ``varied`` (``engines.scenes_varied``), both trained on, and ``alt``
  (``engines.scenes_alt``), never trained on.
* ``build_scene_set(refs)``: every scene decoded from its JPEG and resized to the detector input
  (416×416, INTER_AREA — the same anti-aliased downscale the DALI pipeline does), the ground-truth
  boxes in input pixels, and one jittered ground-truth crop per object (64×64) with its colour and
  vehicle type, for the attribute models.
* ``detectnet_targets(...)``: the DetectNet_v2 training targets for one image — coverage, bbox
  regression in the decode convention of ``infer_server.stage.postprocess`` and a loss mask that makes
  don't-care objects (under 12 px on a side at input scale, KITTI-style) neither positive nor negative.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from multiprocessing import get_context

import cv2
import numpy as np

from engines import scenes, scenes_alt, scenes_varied
from engines.configs import BBOX_NORM, CROP_INPUT, CROP_PADDING, DETECTOR_INPUT, OFFSET, STRIDE
from engines.scenes import COLORS, VEHICLE_TYPES, Scene

DONT_CARE_PX = 12.0  # objects smaller than this on either side (at input scale) are don't-care

STYLES: dict[str, Callable[..., Scene]] = {
    "default": scenes.generate_scene,
    "varied": scenes_varied.generate_scene,
    "alt": scenes_alt.generate_scene,
}
SceneRef = tuple[str, int]  # (style, seed)


def refs(style: str, seeds: Iterable[int]) -> list[SceneRef]:
    if style not in STYLES:
        raise ValueError(f"unknown scene style {style!r}; known: {sorted(STYLES)}")
    return [(style, int(s)) for s in seeds]


def describe(scene_refs: list[SceneRef]) -> str:
    """``default 0–2999 + varied 100000–102999``: each style's seed span, in order of appearance."""
    spans: dict[str, list[int]] = {}
    for style, seed in scene_refs:
        spans.setdefault(style, []).append(seed)
    return " + ".join(f"{style} {min(s)}–{max(s)}" for style, s in spans.items())


def generate(ref: SceneRef) -> Scene:
    style, seed = ref
    return STYLES[style](seed)


@dataclass
class SceneSet:
    images: np.ndarray  # uint8 [N, H, W, 3] RGB at detector input size
    boxes: list[np.ndarray]  # per image float32 [K, 4] in input pixels
    classes: list[np.ndarray]  # per image int64 [K]
    crops: np.ndarray  # uint8 [M, 64, 64, 3] RGB, one per object
    crop_color: np.ndarray  # int64 [M]
    crop_vtype: np.ndarray  # int64 [M], -1 for non-cars


def crop_box(image: np.ndarray, box: tuple[float, float, float, float], padding: float) -> np.ndarray:
    """Crop ``box`` (+ padding on each side) and resize to the attribute models' input."""
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box
    pw, ph = (x2 - x1) * padding, (y2 - y1) * padding
    xa, ya = int(max(0, np.floor(x1 - pw))), int(max(0, np.floor(y1 - ph)))
    xb, yb = int(min(w, np.ceil(x2 + pw))), int(min(h, np.ceil(y2 + ph)))
    patch = image[ya : max(yb, ya + 1), xa : max(xb, xa + 1)]
    interp = cv2.INTER_AREA if patch.shape[0] > CROP_INPUT[1] else cv2.INTER_LINEAR
    return cv2.resize(patch, CROP_INPUT, interpolation=interp)


def _one_scene(ref: SceneRef) -> tuple:
    scene = generate(ref)
    seed = ref[1]
    rgb = scene.decode_rgb()
    small = cv2.resize(rgb, DETECTOR_INPUT, interpolation=cv2.INTER_AREA)
    sx, sy = DETECTOR_INPUT[0] / scene.width, DETECTOR_INPUT[1] / scene.height
    boxes = np.array([o.box for o in scene.objects], np.float32).reshape(-1, 4) * [sx, sy, sx, sy]
    classes = np.array([o.class_id for o in scene.objects], np.int64)
    rng = np.random.default_rng(seed + 1_000_003)
    crops, colors, vtypes = [], [], []
    for o in scene.objects:
        x1, y1, x2, y2 = o.box
        bw, bh = x2 - x1, y2 - y1
        # Jitter like a detector's box error so the classifiers do not depend on perfect boxes.
        j = rng.uniform(-0.08, 0.08, 4) * [bw, bh, bw, bh]
        crops.append(crop_box(rgb, (x1 + j[0], y1 + j[1], x2 + j[2], y2 + j[3]), CROP_PADDING))
        colors.append(COLORS.index(o.color))
        vtypes.append(VEHICLE_TYPES.index(o.vehicle_type) if o.vehicle_type else -1)
    return small, boxes, classes, crops, colors, vtypes


def build_scene_set(scene_refs: list[SceneRef], processes: int = 2, progress: bool = True) -> SceneSet:
    from tqdm import tqdm

    with get_context("spawn").Pool(processes) as pool:
        it = pool.imap(_one_scene, scene_refs, chunksize=16)
        rows = list(tqdm(it, total=len(scene_refs), desc="scenes", disable=not progress))
    return SceneSet(
        images=np.stack([r[0] for r in rows]),
        boxes=[r[1] for r in rows],
        classes=[r[2] for r in rows],
        crops=np.stack([c for r in rows for c in r[3]]),
        crop_color=np.array([c for r in rows for c in r[4]], np.int64),
        crop_vtype=np.array([c for r in rows for c in r[5]], np.int64),
    )


def is_dont_care(boxes: np.ndarray) -> np.ndarray:
    """Boxes in input pixels under DONT_CARE_PX on either side."""
    return ((boxes[:, 2] - boxes[:, 0]) < DONT_CARE_PX) | ((boxes[:, 3] - boxes[:, 1]) < DONT_CARE_PX)


def detectnet_targets(boxes: np.ndarray, classes: np.ndarray, num_classes: int,
                      grid_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage [C,Gh,Gw], bbox [4C,Gh,Gw] and loss mask [C,Gh,Gw] for one image.

    A cell is positive for an object when its anchor point ``(j*stride+offset, i*stride+offset)``
    lies in the central part of the box (half-extent: a quarter of the box, at least half a cell).
    Objects are given in drawing order, so a nearer object overwrites the cells of one it occludes.
    """
    gh, gw = grid_hw or (DETECTOR_INPUT[1] // STRIDE, DETECTOR_INPUT[0] // STRIDE)
    cov = np.zeros((num_classes, gh, gw), np.float32)
    bbox = np.zeros((4 * num_classes, gh, gw), np.float32)
    mask = np.ones((num_classes, gh, gw), np.float32)
    px = np.arange(gw, dtype=np.float32) * STRIDE + OFFSET
    py = np.arange(gh, dtype=np.float32) * STRIDE + OFFSET
    ignore = is_dont_care(boxes)
    for (x1, y1, x2, y2), c, dc in zip(boxes, classes, ignore, strict=True):
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        hx, hy = max(0.25 * (x2 - x1), STRIDE / 2), max(0.25 * (y2 - y1), STRIDE / 2)
        cols = np.nonzero(np.abs(px - cx) <= hx)[0]
        rows = np.nonzero(np.abs(py - cy) <= hy)[0]
        if dc:
            # Don't-care: neither a positive nor a negative anywhere near it.
            cols = np.nonzero((px >= x1 - STRIDE / 2) & (px <= x2 + STRIDE / 2))[0]
            rows = np.nonzero((py >= y1 - STRIDE / 2) & (py <= y2 + STRIDE / 2))[0]
            mask[c, rows[:, None], cols[None, :]] = 0.0
            continue
        r, q = rows[:, None], cols[None, :]
        cov[c, r, q] = 1.0
        mask[c, r, q] = 1.0
        bbox[4 * c + 0, r, q] = (px[q] - x1) / BBOX_NORM
        bbox[4 * c + 1, r, q] = (py[r] - y1) / BBOX_NORM
        bbox[4 * c + 2, r, q] = (x2 - px[q]) / BBOX_NORM
        bbox[4 * c + 3, r, q] = (y2 - py[r]) / BBOX_NORM
    return cov, bbox, mask
