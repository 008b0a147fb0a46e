"""A second, separately drawn street-scene style, never used for training: the generalisation check.

``engines.scenes`` draws the scenes the demo models learn from. A model can score well on held-out
scenes of that generator by learning its drawing (flat polygons, muted gradients) rather than the
objects. This module draws the same vocabulary — the four classes, the eight colours, the four
vehicle types, exact amodal boxes — with different code and a different look: textured backgrounds
with buildings, windows, trees and road markings at angles; shaded, outlined bodies with rounded
corners; other silhouettes (cabins, spoked wheels, walking people, diamond and octagon signs);
lighting and colour casts, blur, sensor noise and JPEG quality. The recipe evaluates the shipped
models on it (``engines.evaluate --style alt``) and nothing the recipe trains on comes from here.

Deterministic per seed like ``engines.scenes`` (NumPy PCG64 + OpenCV drawing + OpenCV's JPEG encoder).
``python -m engines.scenes_alt --seed 950000 --count 20 --out DIR`` writes a directory to look at.
"""

from __future__ import annotations

import cv2
import numpy as np

from engines.scenes import CLASSES, COLORS, PALETTE_RGB, Scene, SceneObject, cli, draw_class, encode

# Width / height of each object's box in this style (its own proportions, not the training style's).
ASPECT = {"sedan": 2.3, "suv": 1.8, "truck": 2.5, "van": 1.6, "bicycle": 1.7, "person": 0.36, "road_sign": 0.3}
MIN_OBJ_H, MAX_OBJ_H = 36, 210


def _pt(x: float, y: float) -> tuple[int, int]:
    return round(x), round(y)


def _shade(rgb: tuple[int, ...], factor: float) -> tuple[int, ...]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in rgb)


def _noise_field(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    """Smooth value noise in [-1, 1]: a small random grid upsampled with cubic interpolation."""
    grid = rng.uniform(-1.0, 1.0, (max(2, h * cells // w), cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), -1.0, 1.0)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Sky with texture, facades with window grids, trees, a perspective road with angled markings."""
    horizon = int(h * rng.uniform(0.25, 0.55))
    sky = np.array(rng.integers(120, 230, 3), np.float32)
    sky = 0.5 * sky + 0.5 * sky.mean()
    img = np.empty((h, w, 3), np.float32)
    img[:] = sky
    img += 18.0 * _noise_field(rng, w, h, int(rng.integers(4, 12)))[..., None]
    ground = float(rng.integers(70, 140))
    img[horizon:] = ground + 10.0 * _noise_field(rng, w, h - horizon, 24)[..., None] + rng.integers(-8, 9, 3)
    x = int(rng.integers(-w // 10, 0))
    while x < w:  # facades along the horizon
        fw, fh = int(rng.integers(w // 14, w // 5)), int(rng.integers(h // 8, int(h * 0.45)))
        tone = float(rng.integers(60, 200))
        face = np.array([tone, tone, tone]) + rng.integers(-20, 21, 3)
        top = max(0, horizon - fh)
        cv2.rectangle(img, _pt(x, top), _pt(x + fw, horizon), face.tolist(), -1)
        win = max(3, fw // int(rng.integers(4, 9)))
        lit = face * rng.uniform(0.4, 0.7)
        for wy in range(top + win // 2, horizon - win, win + win // 2):
            for wx in range(x + win // 2, x + fw - win, win + win // 2):
                cv2.rectangle(img, _pt(wx, wy), _pt(wx + win * 0.7, wy + win * 0.9), lit.tolist(), -1)
        x += fw + int(rng.integers(0, w // 20))
    for _ in range(int(rng.integers(0, 5))):  # trees: trunk and a cluster of dark foliage blobs
        tx, tr = float(rng.uniform(0, w)), float(rng.uniform(h * 0.04, h * 0.1))
        ty = horizon + float(rng.uniform(-0.05, 0.05)) * h
        cv2.rectangle(img, _pt(tx - tr * 0.12, ty - tr), _pt(tx + tr * 0.12, ty + tr * 0.6), (70, 55, 40), -1)
        leaf = np.array([50, 90, 45], np.float32) * rng.uniform(0.6, 1.0)
        for _ in range(6):
            cv2.circle(img, _pt(tx + rng.normal(0, tr * 0.5), ty - tr * 1.3 + rng.normal(0, tr * 0.4)),
                       max(2, round(tr * rng.uniform(0.4, 0.8))), leaf.tolist(), -1, cv2.LINE_AA)
    # A road in perspective: a trapezoid from the horizon to the bottom edge, markings converging.
    vx = float(rng.uniform(0.2, 0.8)) * w
    left, right = float(rng.uniform(-0.6, 0.2)) * w, float(rng.uniform(0.8, 1.6)) * w
    asphalt = float(rng.integers(45, 95))
    road = np.array([(vx - w * 0.03, horizon), (vx + w * 0.03, horizon), (right, h), (left, h)], np.int32)
    cv2.fillPoly(img, [road], (asphalt, asphalt, asphalt + 4), cv2.LINE_AA)
    paint = (235, 235, 225) if rng.random() < 0.6 else (220, 190, 80)
    for frac in np.linspace(0.05, 1.0, int(rng.integers(5, 12))):
        a, b = frac, min(1.0, frac + 0.04)
        cx = (1 - a) * vx + a * (left + right) / 2
        cx2 = (1 - b) * vx + b * (left + right) / 2
        y1, y2 = horizon + a * (h - horizon), horizon + b * (h - horizon)
        cv2.line(img, _pt(cx, y1), _pt(cx2, y2), paint, max(1, round(1 + 6 * a)), cv2.LINE_AA)
    if rng.random() < 0.5:  # a crossing at an angle
        y0 = horizon + rng.uniform(0.4, 0.9) * (h - horizon)
        for k in range(int(rng.integers(4, 9))):
            x0 = vx - w * 0.2 + k * w * 0.05
            cv2.line(img, _pt(x0, y0), _pt(x0 + w * 0.03, y0 + h * 0.05), paint, max(2, h // 100), cv2.LINE_AA)
    return img


def _shaded_poly(img: np.ndarray, pts: list[tuple[float, float]], rgb: tuple[int, ...], light: float) -> None:
    """A body in its colour, lighter towards the top, with a darker outline."""
    arr = np.round(np.array(pts)).astype(np.int32)
    cv2.fillPoly(img, [arr], _shade(rgb, light), cv2.LINE_AA)
    y_top, y_bot = arr[:, 1].min(), arr[:, 1].max()
    band = np.array(pts, np.float64)
    band[:, 1] = np.clip(band[:, 1], y_top, y_top + (y_bot - y_top) * 0.35)
    cv2.fillPoly(img, [np.round(band).astype(np.int32)], _shade(rgb, light * 1.12), cv2.LINE_AA)
    cv2.polylines(img, [arr], True, _shade(rgb, 0.55), max(1, round((y_bot - y_top) / 40)), cv2.LINE_AA)


def _spoked_wheel(img: np.ndarray, cx: float, cy: float, r: float, tyre: int) -> None:
    cv2.circle(img, _pt(cx, cy), max(2, round(r)), (25, 25, 28), max(1, tyre), cv2.LINE_AA)
    for ang in np.linspace(0, np.pi, 4, endpoint=False):
        dx, dy = r * np.cos(ang), r * np.sin(ang)
        cv2.line(img, _pt(cx - dx, cy - dy), _pt(cx + dx, cy + dy), (140, 140, 145), 1, cv2.LINE_AA)


def _car_wheel(img: np.ndarray, cx: float, cy: float, r: float) -> None:
    cv2.ellipse(img, _pt(cx, cy), (max(2, round(r)), max(2, round(r * 0.96))), 0, 0, 360, (15, 15, 18), -1,
                cv2.LINE_AA)
    cv2.circle(img, _pt(cx, cy), max(1, round(r * 0.55)), (175, 178, 185), -1, cv2.LINE_AA)
    cv2.circle(img, _pt(cx, cy), max(1, round(r * 0.2)), (60, 60, 65), -1, cv2.LINE_AA)


def _car(img: np.ndarray, x: float, y: float, w: float, h: float, kind: str, rgb: tuple[int, ...],
         right: bool, light: float) -> None:
    r = h * (0.22 if kind in ("sedan", "suv") else 0.18)
    sill = y + h - r * 0.7

    def X(u: float) -> float:  # noqa: N802 - position along the car, mirrored when facing left
        return x + (u if right else 1.0 - u) * w

    glass = _shade((120, 150, 170), light)
    if kind == "sedan":
        body = [(X(0.0), sill), (X(0.0), y + h * 0.5), (X(0.25), y + h * 0.42), (X(0.97), y + h * 0.48),
                (X(1.0), y + h * 0.6), (X(1.0), sill)]
        cabin = [(X(0.27), y + h * 0.44), (X(0.38), y), (X(0.66), y), (X(0.8), y + h * 0.44)]
        _shaded_poly(img, cabin, rgb, light)
        _shaded_poly(img, body, rgb, light)
        cv2.fillPoly(img, [np.round(np.array([(X(0.36), y + h * 0.08), (X(0.64), y + h * 0.08),
                                              (X(0.74), y + h * 0.4), (X(0.31), y + h * 0.4)])).astype(np.int32)],
                     glass, cv2.LINE_AA)
        wheels = (0.2, 0.8)
    elif kind == "suv":
        _shaded_poly(img, [(X(0.0), sill), (X(0.0), y + h * 0.02), (X(0.7), y), (X(0.8), y + h * 0.4),
                           (X(1.0), y + h * 0.46), (X(1.0), sill)], rgb, light)
        for a, b in ((0.05, 0.33), (0.37, 0.68)):
            cv2.fillPoly(img, [np.round(np.array([(X(a), y + h * 0.1), (X(b), y + h * 0.08),
                                                  (X(b + 0.04), y + h * 0.38), (X(a), y + h * 0.38)]))
                               .astype(np.int32)], glass, cv2.LINE_AA)
        wheels = (0.18, 0.8)
    elif kind == "truck":  # a flatbed with a load, then a gap, then a tall cab
        _shaded_poly(img, [(X(0.0), y + h * 0.25), (X(0.62), y + h * 0.25), (X(0.62), sill), (X(0.0), sill)],
                     _shade(rgb, 0.85), light)
        cv2.rectangle(img, _pt(X(0.05), y), _pt(X(0.5), y + h * 0.25), _shade((150, 120, 90), light), -1)
        _shaded_poly(img, [(X(0.66), sill), (X(0.66), y + h * 0.08), (X(0.9), y + h * 0.08), (X(1.0), y + h * 0.5),
                           (X(1.0), sill)], rgb, light)
        cv2.fillPoly(img, [np.round(np.array([(X(0.7), y + h * 0.15), (X(0.88), y + h * 0.15),
                                              (X(0.96), y + h * 0.45), (X(0.7), y + h * 0.45)])).astype(np.int32)],
                     glass, cv2.LINE_AA)
        wheels = (0.14, 0.42, 0.84)
    else:  # van: one rounded box, a sliding-door line, a short bonnet
        _shaded_poly(img, [(X(0.0), sill), (X(0.0), y + h * 0.05), (X(0.04), y), (X(0.82), y),
                           (X(0.9), y + h * 0.35), (X(1.0), y + h * 0.5), (X(1.0), sill)], rgb, light)
        cv2.fillPoly(img, [np.round(np.array([(X(0.78), y + h * 0.07), (X(0.86), y + h * 0.35),
                                              (X(0.7), y + h * 0.35), (X(0.7), y + h * 0.07)])).astype(np.int32)],
                     glass, cv2.LINE_AA)
        cv2.line(img, _pt(X(0.45), y + h * 0.1), _pt(X(0.45), sill), _shade(rgb, 0.5), max(1, round(h / 50)))
        wheels = (0.18, 0.8)
    lamp = (250, 240, 190)
    cv2.circle(img, _pt(X(0.985), y + h * 0.58), max(1, round(h * 0.04)), lamp, -1, cv2.LINE_AA)
    for u in wheels:
        _car_wheel(img, X(u), y + h - r, r)


def _bicycle(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: tuple[int, ...], light: float) -> None:
    r = min(h * 0.34, w * 0.24)
    tyre = max(1, round(r / 6))
    rear, front = (x + r, y + h - r), (x + w - r, y + h - r)
    _spoked_wheel(img, *rear, r, tyre)
    _spoked_wheel(img, *front, r, tyre)
    bb = (x + w * 0.47, y + h - r * 0.95)
    seat = (x + w * 0.4, y + h * 0.3)
    head = (x + w * 0.7, y + h * 0.26)
    frame, t = _shade(rgb, light), max(2, round(h / 12))
    for a, b in ((rear, bb), (bb, seat), (seat, rear), (seat, head), (bb, head), (head, front)):
        cv2.line(img, _pt(*a), _pt(*b), frame, t, cv2.LINE_AA)
    cv2.ellipse(img, _pt(head[0] - w * 0.03, y + h * 0.08), (max(1, round(w * 0.07)), max(1, round(h * 0.07))),
                0, 0, 180, frame, t, cv2.LINE_AA)  # curved bars reach the box top
    cv2.line(img, _pt(*head), _pt(head[0] - w * 0.02, y + h * 0.08), frame, t, cv2.LINE_AA)
    cv2.ellipse(img, _pt(*seat), (max(2, round(w * 0.06)), max(1, round(h * 0.03))), 0, 0, 360, (35, 30, 30), -1)


def _person(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: tuple[int, ...],
            skin: tuple[int, ...], hair: tuple[int, ...], stride: float, light: float) -> None:
    cx = x + w / 2
    head_r = h * 0.07
    cloth, dark = _shade(rgb, light), _shade(rgb, light * 0.8)
    hip = y + h * 0.52
    lw = max(2, round(w * 0.24))
    for s in (-1, 1):  # legs in a walking stride
        foot = (cx + s * stride * w * 0.45, y + h - lw / 2)
        cv2.line(img, _pt(cx + s * w * 0.1, hip), _pt(*foot), dark, lw, cv2.LINE_AA)
    torso = [(cx - w * 0.38, y + h * 0.17), (cx + w * 0.38, y + h * 0.17), (cx + w * 0.3, hip + h * 0.04),
             (cx - w * 0.3, hip + h * 0.04)]
    _shaded_poly(img, torso, rgb, light)
    aw = max(2, round(w * 0.16))
    for s in (-1, 1):
        cv2.line(img, _pt(cx + s * w * 0.38, y + h * 0.2), _pt(cx + s * w * 0.42, y + h * 0.48), cloth, aw,
                 cv2.LINE_AA)
    cv2.ellipse(img, _pt(cx, y + head_r * 1.05), (max(2, round(head_r * 0.85)), max(2, round(head_r))), 0, 0, 360,
                skin, -1, cv2.LINE_AA)
    cv2.ellipse(img, _pt(cx, y + head_r * 0.8), (max(2, round(head_r * 0.9)), max(1, round(head_r * 0.8))), 0, 180,
                360, hair, -1, cv2.LINE_AA)


def _sign(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: tuple[int, ...], shape: int,
          light: float) -> None:
    cx, plate = x + w / 2, w
    pole = max(1, round(w * 0.08))
    cv2.rectangle(img, _pt(cx - pole / 2, y + plate * 0.6), _pt(cx + pole / 2, y + h), (150, 150, 158), -1)
    cy = y + plate / 2
    if shape == 0:  # diamond
        pts = [(cx, y), (x + w, cy), (cx, y + plate), (x, cy)]
    elif shape == 1:  # octagon
        pts = [(cx + plate / 2 * np.cos(a), cy + plate / 2 * np.sin(a)) for a in np.pi / 8 + np.arange(8) * np.pi / 4]
    elif shape == 2:  # rounded rectangle, taller than wide
        pts = [(x, y + plate * 0.15), (x + w * 0.15, y), (x + w * 0.85, y), (x + w, y + plate * 0.15),
               (x + w, y + plate * 1.1), (x, y + plate * 1.1)]
    else:  # disc with a rim
        pts = [(cx + plate / 2 * np.cos(a), cy + plate / 2 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 24)]
    _shaded_poly(img, pts, rgb, light)
    mark = (245, 245, 245) if sum(rgb) < 560 else (25, 25, 25)
    cv2.line(img, _pt(cx - plate * 0.22, cy), _pt(cx + plate * 0.22, cy), mark, max(1, round(plate / 8)), cv2.LINE_AA)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller box's area."""
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(smaller, 1e-6)


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Lighting: exposure, a colour cast, a vignette; optics: blur; sensor: noise."""
    h, w = img.shape[:2]
    cast = rng.uniform(0.85, 1.15, 3).astype(np.float32)
    img = img * cast * np.float32(rng.uniform(0.75, 1.2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = ((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2
    img *= (1.0 - rng.uniform(0.0, 0.6) * d)[..., None]
    sigma = float(rng.choice([0.0, 0.0, 0.6, 1.0, 1.5]))
    if sigma:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += rng.normal(0.0, rng.uniform(1.0, 7.0), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_scene(seed: int, *, width: int | None = None, height: int | None = None) -> Scene:
    """One deterministic scene of this style (same signature and result type as ``engines.scenes``)."""
    rng = np.random.default_rng([seed, 0xA17])  # a stream of its own, unrelated to the training style's
    w = width or int(rng.choice([640, 800, 960, 1024, 1280]))
    h = height or int(w / rng.choice([16 / 9, 4 / 3, 3 / 2, 1.25]))
    img = _background(rng, w, h)
    n = int(rng.integers(1, 11))
    placed: list[tuple[tuple[float, float, float, float], dict]] = []
    for _ in range(n * 5):
        if len(placed) == n:
            break
        class_id, label, vtype = draw_class(rng)
        aspect = ASPECT[vtype or label] * rng.uniform(0.9, 1.1)
        oh = min(float(rng.uniform(MIN_OBJ_H, MAX_OBJ_H)), 0.85 * h, 0.85 * w / aspect)
        ow = oh * aspect
        ox, oy = float(rng.uniform(0, w - ow)), float(rng.uniform(0, h - oh))
        box = (ox, oy, ox + ow, oy + oh)
        if any(_overlap(box, p[0]) > 0.4 for p in placed):
            continue
        color = COLORS[int(rng.integers(8))]
        base = np.array(PALETTE_RGB[color], np.float32) + rng.integers(-14, 15, 3)
        placed.append((box, {"label": label, "vtype": vtype, "color": color,
                             "rgb": tuple(int(v) for v in np.clip(base, 0, 255)),
                             "right": bool(rng.random() < 0.5), "shape": int(rng.integers(4)),
                             "light": float(rng.uniform(0.85, 1.05)), "stride": float(rng.uniform(0.05, 0.35)),
                             "skin": tuple(int(v) for v in rng.integers(90, 230, 3) * [1.0, 0.8, 0.65]),
                             "hair": tuple(int(v) for v in rng.integers(10, 90, 3))}))
    placed.sort(key=lambda p: p[0][3])  # lower boxes are nearer: drawn last, over the others
    objects = []
    for (x1, y1, x2, y2), s in placed:
        bw, bh = x2 - x1, y2 - y1
        if s["label"] == "car":
            _car(img, x1, y1, bw, bh, s["vtype"], s["rgb"], s["right"], s["light"])
        elif s["label"] == "bicycle":
            _bicycle(img, x1, y1, bw, bh, s["rgb"], s["light"])
        elif s["label"] == "person":
            _person(img, x1, y1, bw, bh, s["rgb"], s["skin"], s["hair"], s["stride"], s["light"])
        else:
            _sign(img, x1, y1, bw, bh, s["rgb"], s["shape"], s["light"])
        objects.append(SceneObject(CLASSES.index(s["label"]), s["label"],
                                   (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)), s["color"], s["vtype"]))
    img = _finish(rng, img)
    return encode(seed, img, int(rng.integers(55, 96)), objects)


def main() -> None:
    cli(__doc__, generate_scene, 950_000)


if __name__ == "__main__":
    main()
