"""Procedural "street" scenes with exact ground truth: the data the default models learn from.

Used by the model recipe (training, calibration, evaluation), by the tests (known ground truth for
end-to-end accuracy checks) and by the benchmark (fixed-seed 720p scenes). Everything is a pure
function of the seed: ``generate_scene(seed)`` returns the same JPEG bytes and objects on every
machine (NumPy's PCG64 stream + OpenCV drawing + OpenCV's JPEG encoder at a fixed quality).

Classes follow TrafficCamNet's order (car, bicycle, person, road_sign); each is drawn with a
distinct silhouette, and cars come in four body types with their own proportions. Colours come from
an 8-colour palette with jitter. Boxes are amodal (the full object even where a nearer one occludes
it), as in KITTI.

CLI: ``python -m engines.scenes --seed 7 --count 20 --out DIR`` writes ``DIR/scene_00000.jpg`` …
and ``DIR/ground_truth.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("car", "bicycle", "person", "road_sign")
COLORS = ("black", "white", "red", "green", "blue", "yellow", "orange", "purple")
VEHICLE_TYPES = ("sedan", "suv", "truck", "van")

# Palette in RGB; drawing happens in RGB and is converted to BGR only for encoding.
PALETTE_RGB: dict[str, tuple[int, int, int]] = {
    "black": (22, 22, 24),
    "white": (236, 236, 232),
    "red": (205, 28, 30),
    "green": (30, 165, 45),
    "blue": (30, 65, 205),
    "yellow": (235, 215, 30),
    "orange": (245, 130, 20),
    "purple": (135, 40, 165),
}
# Width / height of each silhouette's box.
ASPECT = {"sedan": 2.6, "suv": 2.0, "truck": 2.8, "van": 1.75, "bicycle": 1.6, "person": 0.4, "road_sign": 0.45}

MIN_W, MAX_W, MIN_H, MAX_H = 640, 1280, 360, 720
MIN_OBJ_H, MAX_OBJ_H = 32, 200


@dataclass(frozen=True)
class SceneObject:
    class_id: int
    label: str
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels (x2/y2 exclusive)
    color: str
    vehicle_type: str | None = None


@dataclass(frozen=True)
class Scene:
    seed: int
    width: int
    height: int
    jpeg: bytes
    quality: int
    objects: tuple[SceneObject, ...]

    def decode_rgb(self) -> np.ndarray:
        bgr = cv2.imdecode(np.frombuffer(self.jpeg, np.uint8), cv2.IMREAD_COLOR)
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Muted vertical gradient (sky to ground), noise, buildings, a road band with lane markings."""
    top = rng.integers(90, 200, 3).astype(np.float32)
    bottom = rng.integers(60, 160, 3).astype(np.float32)
    # Desaturate so backgrounds never look like a palette colour.
    top = 0.6 * top + 0.4 * top.mean()
    bottom = 0.6 * bottom + 0.4 * bottom.mean()
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    img = (top * (1 - t) + bottom * t) * np.ones((1, w, 1), np.float32)
    horizon = int(h * rng.uniform(0.3, 0.5))
    for _ in range(int(rng.integers(2, 7))):  # buildings along the horizon
        bw, bh = int(rng.integers(w // 12, w // 4)), int(rng.integers(h // 10, h // 3))
        bx = int(rng.integers(0, w - bw))
        shade = float(rng.integers(70, 170))
        tint = rng.integers(-12, 13, 3)
        img[max(0, horizon - bh) : horizon, bx : bx + bw] = shade + tint
    road_top = int(h * rng.uniform(0.55, 0.7))
    road = float(rng.integers(55, 100))
    img[road_top:] = road + rng.integers(-6, 7, 3)
    lane_y = road_top + (h - road_top) // 2
    dash = int(rng.integers(30, 70))
    lane_rgb = (225, 225, 225) if rng.random() < 0.7 else (210, 190, 90)
    for x in range(int(rng.integers(0, dash)), w, 2 * dash):
        cv2.line(img, (x, lane_y), (x + dash, lane_y), lane_rgb, max(2, h // 180))
    img += rng.normal(0.0, rng.uniform(3.0, 9.0), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _wheel(img: np.ndarray, cx: float, cy: float, r: float) -> None:
    cv2.circle(img, (round(cx), round(cy)), max(2, round(r)), (18, 18, 18), -1, cv2.LINE_AA)
    cv2.circle(img, (round(cx), round(cy)), max(1, round(r * 0.45)), (150, 150, 150), -1, cv2.LINE_AA)


def _poly(img: np.ndarray, pts: list[tuple[float, float]], rgb: tuple[int, ...]) -> None:
    cv2.fillPoly(img, [np.round(np.array(pts)).astype(np.int32)], rgb, cv2.LINE_AA)


def _draw_car(img: np.ndarray, x: float, y: float, w: float, h: float, kind: str, rgb: tuple[int, ...],
              facing_right: bool) -> None:
    glass = (150, 185, 200)
    r = h * (0.2 if kind in ("sedan", "suv") else 0.17)
    base = y + h - r * 0.9  # bottom of the body; wheels reach the box bottom

    def fx(u: float) -> float:  # u in [0,1] along the car, mirrored when facing left
        return x + (u if facing_right else 1.0 - u) * w

    if kind == "sedan":
        _poly(img, [(fx(0), base), (fx(0), y + 0.5 * h), (fx(0.22), y + 0.45 * h), (fx(0.33), y),
                    (fx(0.68), y), (fx(0.8), y + 0.45 * h), (fx(1), y + 0.55 * h), (fx(1), base)], rgb)
        _poly(img, [(fx(0.36), y + 0.1 * h), (fx(0.65), y + 0.1 * h), (fx(0.74), y + 0.42 * h),
                    (fx(0.29), y + 0.42 * h)], glass)
    elif kind == "suv":
        _poly(img, [(fx(0), base), (fx(0), y + 0.08 * h), (fx(0.72), y), (fx(0.84), y + 0.42 * h),
                    (fx(1), y + 0.48 * h), (fx(1), base)], rgb)
        _poly(img, [(fx(0.06), y + 0.15 * h), (fx(0.68), y + 0.1 * h), (fx(0.77), y + 0.4 * h),
                    (fx(0.06), y + 0.4 * h)], glass)
    elif kind == "truck":
        _poly(img, [(fx(0), y), (fx(0.66), y), (fx(0.66), base), (fx(0), base)], rgb)  # cargo box
        _poly(img, [(fx(0.68), base), (fx(0.68), y + 0.3 * h), (fx(0.88), y + 0.3 * h), (fx(1), y + 0.55 * h),
                    (fx(1), base)], rgb)  # cab
        _poly(img, [(fx(0.72), y + 0.36 * h), (fx(0.86), y + 0.36 * h), (fx(0.94), y + 0.54 * h),
                    (fx(0.72), y + 0.54 * h)], glass)
        cv2.line(img, (round(fx(0.66)), round(base)), (round(fx(0.68)), round(base)), rgb, 2)
    else:  # van: one tall box with a short sloped nose
        _poly(img, [(fx(0), base), (fx(0), y), (fx(0.8), y), (fx(0.95), y + 0.38 * h), (fx(1), y + 0.45 * h),
                    (fx(1), base)], rgb)
        _poly(img, [(fx(0.8), y + 0.08 * h), (fx(0.92), y + 0.38 * h), (fx(0.78), y + 0.38 * h)], glass)
        cv2.rectangle(img, (round(min(fx(0.1), fx(0.7))), round(y + 0.12 * h)),
                      (round(max(fx(0.1), fx(0.7))), round(y + 0.36 * h)), glass, -1)
    for u in (0.2, 0.8) if kind != "truck" else (0.15, 0.45, 0.85):
        _wheel(img, fx(u), y + h - r, r)


def _draw_bicycle(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: tuple[int, ...]) -> None:
    r = min(h * 0.36, w * 0.26)
    t = max(1, round(h / 14))
    back, front = (x + r, y + h - r), (x + w - r, y + h - r)
    for c in (back, front):
        cv2.circle(img, (round(c[0]), round(c[1])), round(r - t / 2), (20, 20, 20), t, cv2.LINE_AA)
    crank = (x + w * 0.45, y + h - r)
    seat = (x + w * 0.36, y + h * 0.22)
    head = (x + w * 0.68, y + h * 0.18)
    for a, b in ((back, crank), (crank, seat), (seat, back), (seat, head), (head, crank), (head, front)):
        cv2.line(img, (round(a[0]), round(a[1])), (round(b[0]), round(b[1])), rgb, max(2, t), cv2.LINE_AA)
    cv2.line(img, (round(head[0]), round(y)), (round(head[0] + w * 0.08), round(y)), rgb, max(2, t), cv2.LINE_AA)
    cv2.line(img, (round(head[0]), round(y)), (round(head[0]), round(head[1])), rgb, max(2, t), cv2.LINE_AA)
    cv2.line(img, (round(seat[0] - w * 0.06), round(seat[1])), (round(seat[0] + w * 0.06), round(seat[1])),
             (30, 30, 30), max(2, t), cv2.LINE_AA)


def _draw_person(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: tuple[int, ...],
                 skin: tuple[int, ...]) -> None:
    hr = h * 0.08
    cx = x + w / 2
    cv2.circle(img, (round(cx), round(y + hr)), max(2, round(hr)), skin, -1, cv2.LINE_AA)
    _poly(img, [(x + w * 0.12, y + h * 0.17), (x + w * 0.88, y + h * 0.17), (x + w * 0.8, y + h * 0.55),
                (x + w * 0.2, y + h * 0.55)], rgb)  # torso
    leg = max(2, round(w * 0.22))
    for dx in (-0.17, 0.17):
        cv2.line(img, (round(cx + dx * w), round(y + h * 0.55)), (round(cx + dx * w * 1.3), round(y + h - leg / 2)),
                 rgb, leg, cv2.LINE_AA)
    arm = max(2, round(w * 0.14))
    for sx in (0.06, 0.94):
        cv2.line(img, (round(x + sx * w), round(y + h * 0.2)), (round(x + sx * w), round(y + h * 0.5)), rgb, arm,
                 cv2.LINE_AA)


def _draw_sign(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: tuple[int, ...],
               shape: int) -> None:
    plate = w
    cx = x + w / 2
    pole = max(2, round(w * 0.12))
    cv2.rectangle(img, (round(cx - pole / 2), round(y + plate * 0.5)), (round(cx + pole / 2), round(y + h)),
                  (120, 120, 125), -1)
    if shape == 0:
        cv2.circle(img, (round(cx), round(y + plate / 2)), max(2, round(plate / 2)), rgb, -1, cv2.LINE_AA)
    elif shape == 1:
        _poly(img, [(x, y + plate), (x + w, y + plate), (cx, y)], rgb)
    else:
        cv2.rectangle(img, (round(x), round(y)), (round(x + w), round(y + plate)), rgb, -1)
    border = (245, 245, 245) if rgb[0] + rgb[1] + rgb[2] < 600 else (30, 30, 30)
    cv2.circle(img, (round(cx), round(y + plate / 2)), max(1, round(plate * 0.18)), border, -1, cv2.LINE_AA)


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def overlap_of(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Fraction of ``a`` covered by ``b``."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    return iw * ih / max(1e-6, (a[2] - a[0]) * (a[3] - a[1]))


def draw_class(rng: np.random.Generator) -> tuple[int, str, str | None]:
    """An object's class, and a vehicle type for a car: the draw every scene style shares (the same
    random numbers in the same order, so a seed keeps its scene)."""
    class_id = int(rng.choice(4, p=(0.4, 0.15, 0.25, 0.2)))
    label = CLASSES[class_id]
    return class_id, label, VEHICLE_TYPES[int(rng.integers(4))] if label == "car" else None


def crowds(box: tuple[float, ...], others: list[tuple[float, float, float, float]]) -> bool:
    """``box`` would hide one of ``others`` too much, or be hidden by it (IoU > 0.3, or over half of
    either covered): such a placement is skipped."""
    return any(iou(box, o) > 0.3 or overlap_of(box, o) > 0.5 or overlap_of(o, box) > 0.5 for o in others)


def generate_scene(seed: int, *, width: int | None = None, height: int | None = None) -> Scene:
    """One deterministic scene. ``width``/``height`` fix the canvas (e.g. 1280×720 for benchmarks)."""
    rng = np.random.default_rng(seed)
    w = width or int(rng.integers(MIN_W, MAX_W + 1))
    h = height or int(rng.integers(MIN_H, MAX_H + 1))
    img = _background(rng, w, h)
    n = int(rng.integers(1, 13))
    placed: list[tuple[float, tuple[float, float, float, float], dict]] = []
    for _ in range(n * 4):  # placement attempts; objects that would hide others too much are skipped
        if len(placed) == n:
            break
        class_id, label, vtype = draw_class(rng)
        aspect = ASPECT[vtype or label] * rng.uniform(0.92, 1.08)
        oh = float(rng.uniform(MIN_OBJ_H, MAX_OBJ_H))
        oh = min(oh, 0.9 * h, 0.9 * w / aspect)
        ow = oh * aspect
        ox = float(rng.uniform(0, w - ow))
        oy = float(rng.uniform(0, h - oh))
        box = (ox, oy, ox + ow, oy + oh)
        if crowds(box, [p[1] for p in placed]):
            continue
        color = COLORS[int(rng.integers(8))]
        style = {"label": label, "vtype": vtype, "color": color, "rgb": _jitter(rng, PALETTE_RGB[color]),
                 "facing_right": bool(rng.random() < 0.5), "shape": int(rng.integers(3)),
                 "skin": _jitter(rng, (200, 160, 130), 30)}
        placed.append((oy + oh, box, style))
    # Far (higher up) objects first so nearer ones occlude them.
    placed.sort(key=lambda p: p[0])
    objects = []
    for _, (x1, y1, x2, y2), s in placed:
        bw, bh = x2 - x1, y2 - y1
        if s["label"] == "car":
            _draw_car(img, x1, y1, bw, bh, s["vtype"], s["rgb"], s["facing_right"])
        elif s["label"] == "bicycle":
            _draw_bicycle(img, x1, y1, bw, bh, s["rgb"])
        elif s["label"] == "person":
            _draw_person(img, x1, y1, bw, bh, s["rgb"], s["skin"])
        else:
            _draw_sign(img, x1, y1, bw, bh, s["rgb"], s["shape"])
        objects.append(SceneObject(CLASSES.index(s["label"]), s["label"],
                                   (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)), s["color"], s["vtype"]))
    return encode(seed, img, int(rng.integers(70, 96)), objects)


def write_scenes(out: Path, seeds: list[int], *, width: int | None = None, height: int | None = None,
                 generate: Callable[..., Scene] | None = None) -> Path:
    """Write ``scene_XXXXX.jpg`` files and ``ground_truth.json``; returns the JSON path.
    ``generate`` draws each scene (default: this module's ``generate_scene``; ``engines.scenes_alt``
    passes its own)."""
    out.mkdir(parents=True, exist_ok=True)
    draw = generate or generate_scene
    truth = []
    for i, seed in enumerate(seeds):
        scene = draw(seed, width=width, height=height)
        name = f"scene_{i:05d}.jpg"
        (out / name).write_bytes(scene.jpeg)
        truth.append({"file": name, "seed": seed, "width": scene.width, "height": scene.height,
                      "objects": [asdict(o) for o in scene.objects]})
    path = out / "ground_truth.json"
    path.write_text(json.dumps(truth, indent=1))
    return path


def encode(seed: int, rgb: np.ndarray, quality: int, objects: list[SceneObject]) -> Scene:
    """The scene as its JPEG (RGB pixels, OpenCV's encoder at ``quality``) and its ground truth."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return Scene(seed, rgb.shape[1], rgb.shape[0], buf.tobytes(), quality, tuple(objects))


def cli(doc: str, generate: Callable[..., Scene], default_seed: int) -> None:
    """``--seed --count --out [--size]``: write ``count`` scenes of ``generate`` and their ground truth."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=default_seed, help="first seed; scene i uses seed + i")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", default=None, help="fixed canvas WxH, e.g. 1280x720")
    a = p.parse_args()
    wh = tuple(int(v) for v in a.size.split("x")) if a.size else (None, None)
    path = write_scenes(a.out, [a.seed + i for i in range(a.count)], width=wh[0], height=wh[1], generate=generate)
    print(f"wrote {a.count} scenes and {path}")


def main() -> None:
    cli(__doc__, generate_scene, 0)


if __name__ == "__main__":
    main()
