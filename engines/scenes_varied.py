"""A randomised drawing of the training vocabulary: the scenes that teach the default models the
objects rather than one way of drawing them (recipe only).

``engines.scenes`` draws flat silhouettes on muted backgrounds; this module draws the same classes,
colours and vehicle types with far more variety: canvases from portrait to 2:1; backgrounds of
several kinds (sky and road, facades with windows, textured ground, clutter, trees, road markings at
angles, shadows); several silhouettes and proportions per class (four car bodies with random
geometry, people in several poses and clothes, bicycle frames, signs of seven shapes); scale
log-uniform from 28 px to 40% of the frame; partial occlusion by other objects and by foreground
clutter; lighting (exposure, colour cast, gamma, vignette), blur, sensor noise and JPEG quality 45–95.
Boxes are amodal, as in ``engines.scenes``.

The recipe trains on both drawings (``engines.build``); ``engines.scenes_alt``, written separately,
is never trained on and measures how far the models generalise. Like the other styles, a scene is a
pure function of its seed (its own PCG64 stream, OpenCV drawing and JPEG encoding).

CLI: ``python -m engines.scenes_varied --seed 100000 --count 20 --out DIR``.
"""

from __future__ import annotations

import cv2
import numpy as np

from engines.scenes import (
    CLASSES,
    COLORS,
    PALETTE_RGB,
    Scene,
    SceneObject,
    cli,
    crowds,
    draw_class,
    encode,
)

# Typical width / height of each silhouette's box; each object varies it by ±15%.
ASPECT = {"sedan": 2.6, "suv": 2.0, "truck": 2.8, "van": 1.75, "bicycle": 1.6, "person": 0.4, "road_sign": 0.4}

MIN_W, MAX_W, MIN_H, MAX_H = 512, 1280, 320, 960
MIN_OBJ_H, MAX_OBJ_H = 28, 260
MIN_QUALITY, MAX_QUALITY = 45, 95
MAX_OBJECTS = 14
STREAM = 0x5CE7E5  # mixed into the seed: a stream of its own, unrelated to engines.scenes at the same seed

Color = tuple[int, ...]


def _jitter(rng: np.random.Generator, rgb: tuple[int, ...], amount: int = 18) -> Color:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)


def _scale(rgb: Color, f: float) -> Color:
    return tuple(int(np.clip(c * f, 0, 255)) for c in rgb)


def _ip(x: float, y: float) -> tuple[int, int]:
    return round(x), round(y)


def _muted(rng: np.random.Generator, lo: int = 50, hi: int = 200, sat: float = 0.35) -> Color:
    """A background colour: mostly grey, a little tint, never a clean palette colour."""
    c = rng.integers(lo, hi, 3).astype(np.float32)
    c = sat * c + (1 - sat) * c.mean()
    return tuple(int(v) for v in c)


# --- backgrounds ---------------------------------------------------------------------------------

def _texture(rng: np.random.Generator, w: int, h: int, amount: float) -> np.ndarray:
    """Two octaves of smooth noise plus grain, [h, w, 1] float32, roughly ±amount."""
    out = np.zeros((h, w), np.float32)
    for cells, weight in ((int(rng.integers(3, 9)), 1.0), (int(rng.integers(16, 48)), 0.5)):
        grid = rng.normal(0.0, 1.0, (max(2, cells * h // max(w, 1)), cells)).astype(np.float32)
        out += weight * cv2.resize(grid, (w, h), interpolation=cv2.INTER_LINEAR)
    return (amount * out / 1.5)[..., None]


def _facades(rng: np.random.Generator, img: np.ndarray, horizon: int) -> None:
    w, h = img.shape[1], img.shape[0]
    x = -int(rng.integers(0, w // 8 + 1))
    while x < w:
        bw, bh = int(rng.integers(w // 16 + 8, w // 4 + 9)), int(rng.integers(h // 10, int(h * 0.55) + 1))
        top = max(0, horizon - bh)
        wall = _muted(rng, 60, 210)
        cv2.rectangle(img, (x, top), (x + bw, horizon), wall, -1)
        if rng.random() < 0.7:  # a grid of windows, dark or lit
            ww, wh = int(rng.integers(3, 14)), int(rng.integers(4, 18))
            gx, gy = ww + int(rng.integers(3, 12)), wh + int(rng.integers(4, 14))
            pane = _scale(wall, rng.uniform(0.35, 0.7)) if rng.random() < 0.7 else _muted(rng, 150, 240, 0.5)
            for wy in range(top + gy // 2, horizon - wh, gy):
                for wx in range(x + gx // 2, x + bw - ww, gx):
                    cv2.rectangle(img, (wx, wy), (wx + ww, wy + wh), pane, -1)
        x += bw + int(rng.integers(0, w // 12 + 1))


def _trees(rng: np.random.Generator, img: np.ndarray, base_y: float, count: int) -> None:
    w, h = img.shape[1], img.shape[0]
    for _ in range(count):
        tx, size = float(rng.uniform(0, w)), float(rng.uniform(0.04, 0.16) * h)
        ty = base_y + float(rng.uniform(-0.05, 0.08) * h)
        trunk = _muted(rng, 40, 110, 0.6)
        cv2.line(img, _ip(tx, ty), _ip(tx, ty - size), trunk, max(2, round(size * 0.1)))
        leaf = tuple(int(v) for v in (np.array([40, 80, 40]) * rng.uniform(0.5, 1.3) + rng.integers(-15, 16, 3)))
        if rng.random() < 0.5:  # conifer: stacked triangles
            for k in range(3):
                yk = ty - size * (0.3 + 0.3 * k)
                half = size * (0.45 - 0.1 * k)
                pts = np.array([_ip(tx - half, yk), _ip(tx + half, yk), _ip(tx, yk - size * 0.5)], np.int32)
                cv2.fillPoly(img, [pts], leaf, cv2.LINE_AA)
        else:  # broadleaf: an ellipse crown
            cv2.ellipse(img, _ip(tx, ty - size), (max(2, round(size * rng.uniform(0.35, 0.6))),
                        max(2, round(size * rng.uniform(0.4, 0.7)))), 0, 0, 360, leaf, -1, cv2.LINE_AA)


def _markings(rng: np.random.Generator, img: np.ndarray, top: int) -> None:
    """Lane dashes and crossings at random angles on the ground part of the image."""
    w, h = img.shape[1], img.shape[0]
    paint = (228, 228, 222) if rng.random() < 0.7 else (215, 190, 85)
    thick = max(2, h // int(rng.integers(90, 220)))
    for _ in range(int(rng.integers(1, 4))):
        ang = float(rng.uniform(-0.6, 0.6)) if rng.random() < 0.7 else float(rng.uniform(0.6, 1.4))
        x0, y0 = float(rng.uniform(0, w)), float(rng.uniform(top, h))
        dx, dy = np.cos(ang), np.sin(ang)
        dash, gap = float(rng.uniform(15, 70)), float(rng.uniform(15, 70))
        for t in np.arange(-1.5 * w, 1.5 * w, dash + gap):
            a, b = (x0 + dx * t, y0 + dy * t), (x0 + dx * (t + dash), y0 + dy * (t + dash))
            if top <= a[1] <= h or top <= b[1] <= h:
                cv2.line(img, _ip(*a), _ip(*b), paint, thick, cv2.LINE_AA)


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> None:
    """Shapes that are not objects: bins, benches, boxes, blobs, cables, some of them brightly coloured."""
    w, h = img.shape[1], img.shape[0]
    for _ in range(count):
        c = _jitter(rng, PALETTE_RGB[str(rng.choice(COLORS))], 30) if rng.random() < 0.25 else _muted(rng, 30, 230)
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        s = float(rng.uniform(0.01, 0.08) * h)
        kind = int(rng.integers(4))
        if kind == 0:
            cv2.rectangle(img, _ip(x, y), _ip(x + s * rng.uniform(0.5, 3), y + s * rng.uniform(0.3, 1.2)), c, -1)
        elif kind == 1:
            cv2.ellipse(img, _ip(x, y), (max(1, round(s)), max(1, round(s * rng.uniform(0.3, 1)))),
                        float(rng.uniform(0, 180)), 0, 360, c, -1, cv2.LINE_AA)
        elif kind == 2:
            cv2.line(img, _ip(x, y), _ip(x + rng.uniform(-3, 3) * s, y + rng.uniform(-1, 1) * s), c,
                     max(1, round(s * 0.1)), cv2.LINE_AA)
        else:
            pts = np.array([_ip(x + rng.uniform(-s, s), y + rng.uniform(-s, s)) for _ in range(5)], np.int32)
            cv2.fillPoly(img, [pts], c, cv2.LINE_AA)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Sky, far things (facades, trees), ground with texture and markings, clutter."""
    horizon = int(h * rng.uniform(0.2, 0.6))
    sky_top, sky_bottom = np.array(_muted(rng, 90, 230, 0.5), np.float32), np.array(_muted(rng, 110, 240, 0.4),
                                                                                   np.float32)
    t = np.linspace(0.0, 1.0, max(horizon, 1), dtype=np.float32)[:, None, None]
    img = np.empty((h, w, 3), np.float32)
    img[:horizon] = sky_top * (1 - t) + sky_bottom * t
    ground = np.array(_muted(rng, 45, 150, 0.3), np.float32)
    img[horizon:] = ground
    img += _texture(rng, w, h, float(rng.uniform(2, 16)))
    if rng.random() < 0.8:
        _facades(rng, img, horizon)
    _trees(rng, img, horizon, int(rng.integers(0, 6)))
    if rng.random() < 0.75:  # a road band or wedge
        road = float(rng.integers(40, 110))
        if rng.random() < 0.5:
            top = int(rng.uniform(horizon, h * 0.85))
            img[top:] = road + rng.integers(-6, 7, 3) + _texture(rng, w, h - top, 4.0)
        else:
            vx = float(rng.uniform(0.1, 0.9) * w)
            pts = np.array([_ip(vx - 5, horizon), _ip(vx + 5, horizon), _ip(rng.uniform(0.7, 1.8) * w, h),
                            _ip(rng.uniform(-0.8, 0.3) * w, h)], np.int32)
            cv2.fillPoly(img, [pts], (road, road, road + 3), cv2.LINE_AA)
    if rng.random() < 0.85:
        _markings(rng, img, horizon)
    _clutter(rng, img, int(rng.integers(0, 10)))
    if rng.random() < 0.4:  # a soft shadow across part of the scene
        pts = np.array([_ip(rng.uniform(0, w), rng.uniform(0, h)) for _ in range(4)], np.int32)
        mask = np.zeros((h, w), np.float32)
        cv2.fillPoly(mask, [cv2.convexHull(pts)], 1.0)
        mask = cv2.GaussianBlur(mask, (0, 0), max(1.0, 0.02 * w))[..., None]
        img *= 1.0 - float(rng.uniform(0.2, 0.5)) * mask
    return img


# --- objects -------------------------------------------------------------------------------------

def _body(img: np.ndarray, pts: list[tuple[float, float]], rgb: Color, look: dict) -> None:
    """A filled silhouette part, optionally shaded (lighter on top) and outlined."""
    arr = np.round(np.array(pts)).astype(np.int32)
    cv2.fillPoly(img, [arr], rgb, cv2.LINE_AA)
    if look["shade"]:
        y0, y1 = float(arr[:, 1].min()), float(arr[:, 1].max())
        top = np.array(pts, np.float64)
        top[:, 1] = np.clip(top[:, 1], y0, y0 + (y1 - y0) * look["band"])
        cv2.fillPoly(img, [np.round(top).astype(np.int32)], _scale(rgb, look["shade"]), cv2.LINE_AA)
    if look["outline"]:
        cv2.polylines(img, [arr], True, _scale(rgb, 0.5), look["outline"], cv2.LINE_AA)


def _wheel(img: np.ndarray, cx: float, cy: float, r: float, hub: Color, hub_frac: float) -> None:
    cv2.circle(img, _ip(cx, cy), max(2, round(r)), (18, 18, 20), -1, cv2.LINE_AA)
    cv2.circle(img, _ip(cx, cy), max(1, round(r * hub_frac)), hub, -1, cv2.LINE_AA)


def _draw_car(img: np.ndarray, x: float, y: float, w: float, h: float, kind: str, rgb: Color, right: bool,
              rng: np.random.Generator, look: dict) -> None:
    glass = _muted(rng, 90, 210, 0.6)
    r = h * rng.uniform(0.16, 0.24)
    base = y + h - r * rng.uniform(0.7, 1.0)

    def fx(u: float) -> float:  # u in [0,1] along the car, mirrored when facing left
        return x + (u if right else 1.0 - u) * w

    if kind == "sedan":
        roof0, roof1 = rng.uniform(0.25, 0.38), rng.uniform(0.6, 0.72)
        belt = rng.uniform(0.4, 0.55)
        _body(img, [(fx(0), base), (fx(0), y + belt * h), (fx(roof0 - 0.08), y + (belt - 0.05) * h), (fx(roof0), y),
                    (fx(roof1), y), (fx(roof1 + 0.12), y + (belt - 0.05) * h), (fx(1), y + (belt + 0.08) * h),
                    (fx(1), base)], rgb, look)
        _body(img, [(fx(roof0 + 0.03), y + 0.1 * h), (fx(roof1 - 0.02), y + 0.1 * h),
                    (fx(roof1 + 0.07), y + (belt - 0.06) * h), (fx(roof0 - 0.03), y + (belt - 0.06) * h)],
              glass, look | {"outline": 0})
        wheels = (rng.uniform(0.15, 0.24), rng.uniform(0.76, 0.85))
    elif kind == "suv":
        nose = rng.uniform(0.7, 0.8)
        _body(img, [(fx(0), base), (fx(0), y + 0.06 * h), (fx(0.04), y), (fx(nose), y),
                    (fx(nose + 0.1), y + 0.42 * h), (fx(1), y + 0.48 * h), (fx(1), base)], rgb, look)
        split = rng.uniform(0.35, 0.5)
        for a, b in ((0.07, split - 0.03), (split + 0.02, nose + 0.02)):
            _body(img, [(fx(a), y + 0.12 * h), (fx(b), y + 0.12 * h), (fx(b + 0.05), y + 0.4 * h),
                        (fx(a), y + 0.4 * h)], glass, look | {"outline": 0})
        wheels = (rng.uniform(0.14, 0.22), rng.uniform(0.78, 0.86))
    elif kind == "truck":
        cab = rng.uniform(0.62, 0.72)
        cargo_top = y + (0.0 if rng.random() < 0.6 else rng.uniform(0.2, 0.4) * h)
        _body(img, [(fx(0), cargo_top), (fx(cab - 0.03), cargo_top), (fx(cab - 0.03), base), (fx(0), base)],
              _scale(rgb, rng.uniform(0.8, 1.0)) if rng.random() < 0.7 else _muted(rng, 80, 220), look)
        _body(img, [(fx(cab), base), (fx(cab), y + 0.2 * h), (fx(0.9), y + 0.2 * h), (fx(1), y + 0.55 * h),
                    (fx(1), base)], rgb, look)
        _body(img, [(fx(cab + 0.04), y + 0.28 * h), (fx(0.88), y + 0.28 * h), (fx(0.95), y + 0.52 * h),
                    (fx(cab + 0.04), y + 0.52 * h)], glass, look | {"outline": 0})
        wheels = (0.12, 0.3, 0.85) if rng.random() < 0.5 else (0.15, 0.45, 0.86)
    else:  # van
        nose = rng.uniform(0.78, 0.88)
        _body(img, [(fx(0), base), (fx(0), y + 0.04 * h), (fx(0.03), y), (fx(nose), y), (fx(nose + 0.07), y + 0.38 * h),
                    (fx(1), y + 0.46 * h), (fx(1), base)], rgb, look)
        _body(img, [(fx(nose - 0.02), y + 0.08 * h), (fx(nose + 0.05), y + 0.38 * h), (fx(nose - 0.12), y + 0.38 * h),
                    (fx(nose - 0.12), y + 0.08 * h)], glass, look | {"outline": 0})
        if rng.random() < 0.6:
            cv2.rectangle(img, _ip(min(fx(0.08), fx(0.6)), y + 0.1 * h), _ip(max(fx(0.08), fx(0.6)), y + 0.36 * h),
                          glass, -1)
        wheels = (rng.uniform(0.14, 0.2), rng.uniform(0.78, 0.84))
    hub = _muted(rng, 110, 220, 0.2)
    hub_frac = float(rng.uniform(0.3, 0.6))
    for u in wheels:
        _wheel(img, fx(u), y + h - r, r, hub, hub_frac)
    if rng.random() < 0.5:  # lamps
        cv2.circle(img, _ip(fx(0.98), y + 0.6 * h), max(1, round(h * 0.04)), (245, 235, 190), -1, cv2.LINE_AA)
        cv2.circle(img, _ip(fx(0.02), y + 0.55 * h), max(1, round(h * 0.035)), (190, 30, 30), -1, cv2.LINE_AA)


def _draw_bicycle(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: Color, rng: np.random.Generator,
                  look: dict) -> None:
    r = min(h * rng.uniform(0.3, 0.38), w * 0.26)
    t = max(1, round(h / rng.uniform(10, 18)))
    back, front = (x + r, y + h - r), (x + w - r, y + h - r)
    tyre = (20, 20, 20) if rng.random() < 0.8 else _muted(rng, 20, 90)
    for c in (back, front):
        cv2.circle(img, _ip(*c), max(2, round(r - t / 2)), tyre, t, cv2.LINE_AA)
        if rng.random() < 0.5:
            cv2.circle(img, _ip(*c), max(1, round(r * 0.12)), (120, 120, 120), -1)
    crank = (x + w * rng.uniform(0.4, 0.5), y + h - r)
    seat = (x + w * rng.uniform(0.3, 0.42), y + h * rng.uniform(0.15, 0.3))
    head = (x + w * rng.uniform(0.62, 0.72), y + h * rng.uniform(0.12, 0.25))
    step = rng.random() < 0.3  # a step-through frame: the top tube dips to the crank
    tubes = [(back, crank), (crank, seat), (seat, back), (head, front), (head, crank)]
    tubes.append((seat, head) if not step else ((crank[0] + w * 0.05, crank[1] - h * 0.1), head))
    thick = max(2, round(t * rng.uniform(0.8, 1.5)))
    for a, b in tubes:
        cv2.line(img, _ip(*a), _ip(*b), rgb, thick, cv2.LINE_AA)
    bar = rng.uniform(-0.1, 0.1)
    cv2.line(img, _ip(head[0], y), _ip(head[0] + w * (0.08 + bar), y), rgb, thick, cv2.LINE_AA)
    cv2.line(img, _ip(head[0], y), _ip(*head), rgb, thick, cv2.LINE_AA)
    cv2.line(img, _ip(seat[0] - w * 0.06, seat[1]), _ip(seat[0] + w * 0.06, seat[1]), (30, 30, 30), thick + 1,
             cv2.LINE_AA)


def _draw_person(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: Color, rng: np.random.Generator,
                 look: dict) -> None:
    skin = _jitter(rng, tuple(int(v) for v in np.array([200, 160, 130]) * rng.uniform(0.45, 1.1)), 20)
    hr = h * rng.uniform(0.065, 0.09)
    cx = x + w / 2
    cv2.circle(img, _ip(cx, y + hr), max(2, round(hr)), skin, -1, cv2.LINE_AA)
    if rng.random() < 0.7:  # hair or a hat
        cv2.ellipse(img, _ip(cx, y + hr * 0.8), (max(2, round(hr)), max(1, round(hr * 0.7))), 0, 180, 360,
                    _muted(rng, 10, 120, 0.5), -1, cv2.LINE_AA)
    shoulder, hip = y + h * rng.uniform(0.16, 0.2), y + h * rng.uniform(0.5, 0.58)
    lower = rgb if rng.random() < 0.6 else _scale(rgb, rng.uniform(0.6, 0.85))
    leg = max(2, round(w * rng.uniform(0.16, 0.26)))
    if rng.random() < 0.25:  # dress or long coat: one trapezoid down to the shins
        _body(img, [(x + w * 0.15, shoulder), (x + w * 0.85, shoulder), (x + w, y + h * 0.85), (x, y + h * 0.85)],
              rgb, look)
        for dx in (-0.12, 0.12):
            cv2.line(img, _ip(cx + dx * w, y + h * 0.8), _ip(cx + dx * w, y + h - 1), _scale(skin, 0.8),
                     max(2, leg // 2), cv2.LINE_AA)
    else:
        _body(img, [(x + w * 0.12, shoulder), (x + w * 0.88, shoulder), (x + w * 0.8, hip + h * 0.04),
                    (x + w * 0.2, hip + h * 0.04)], rgb, look)
        stride = rng.uniform(0.0, 0.45)
        for s in (-1, 1):
            cv2.line(img, _ip(cx + s * 0.17 * w, hip), _ip(cx + s * (0.17 + stride) * w * 0.9, y + h - leg / 2),
                     lower, leg, cv2.LINE_AA)
    arm = max(2, round(w * rng.uniform(0.1, 0.16)))
    pose = int(rng.integers(3))
    for side, sx in ((-1, 0.06), (1, 0.94)):
        top = (x + sx * w, shoulder + h * 0.03)
        if pose == 1 and side == 1:  # one arm raised
            end = (x + sx * w, y + h * 0.02)
        elif pose == 2:  # arms swinging
            end = (x + (sx + side * 0.05) * w, y + h * 0.5)
        else:
            end = (x + sx * w, y + h * 0.5)
        cv2.line(img, _ip(*top), _ip(*end), rgb, arm, cv2.LINE_AA)
    if rng.random() < 0.2:  # a bag
        bx = x + w * (0.0 if rng.random() < 0.5 else 0.7)
        cv2.rectangle(img, _ip(bx, y + h * 0.42), _ip(bx + w * 0.3, y + h * 0.55), _muted(rng, 30, 160), -1)


def _draw_sign(img: np.ndarray, x: float, y: float, w: float, h: float, rgb: Color, shape: int,
               rng: np.random.Generator, look: dict) -> None:
    plate = w
    cx, cy = x + w / 2, y + plate / 2
    pole = max(2, round(w * rng.uniform(0.07, 0.16)))
    cv2.rectangle(img, _ip(cx - pole / 2, y + plate * 0.5), _ip(cx + pole / 2, y + h), _muted(rng, 90, 170, 0.2), -1)
    rad = plate / 2
    if shape == 0:  # disc
        pts = [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 28, endpoint=False)]
    elif shape == 1:  # triangle up
        pts = [(x, y + plate), (x + w, y + plate), (cx, y)]
    elif shape == 2:  # triangle down
        pts = [(x, y), (x + w, y), (cx, y + plate)]
    elif shape == 3:  # square
        pts = [(x, y), (x + w, y), (x + w, y + plate), (x, y + plate)]
    elif shape == 4:  # diamond
        pts = [(cx, y), (x + w, cy), (cx, y + plate), (x, cy)]
    elif shape == 5:  # octagon
        pts = [(cx + rad * np.cos(a), cy + rad * np.sin(a)) for a in np.pi / 8 + np.arange(8) * np.pi / 4]
    else:  # tall rectangle
        pts = [(x, y), (x + w, y), (x + w, y + plate * 1.4), (x, y + plate * 1.4)]
    _body(img, pts, rgb, look)
    mark = (245, 245, 245) if sum(rgb) < 560 else (25, 25, 25)
    symbol = int(rng.integers(4))
    if symbol == 0:
        cv2.circle(img, _ip(cx, cy), max(1, round(plate * 0.18)), mark, -1, cv2.LINE_AA)
    elif symbol == 1:
        cv2.line(img, _ip(cx - plate * 0.25, cy), _ip(cx + plate * 0.25, cy), mark, max(1, round(plate / 8)))
    elif symbol == 2:
        cv2.arrowedLine(img, _ip(cx - plate * 0.2, cy), _ip(cx + plate * 0.22, cy), mark, max(1, round(plate / 10)),
                        tipLength=0.4)
    if rng.random() < 0.4:
        cv2.polylines(img, [np.round(np.array(pts)).astype(np.int32)], True, mark if rng.random() < 0.5 else
                      (235, 235, 235), max(1, round(plate / 14)), cv2.LINE_AA)


# --- composition ---------------------------------------------------------------------------------


def _occluders(rng: np.random.Generator, img: np.ndarray, boxes: list[tuple[float, ...]]) -> None:
    """Foreground clutter over a few objects (a post, a bush, a railing): at most a third of a box."""
    for x1, y1, x2, y2 in boxes:
        if rng.random() > 0.15:
            continue
        bw, bh = x2 - x1, y2 - y1
        c = _muted(rng, 30, 200)
        if rng.random() < 0.5:  # vertical post
            px = float(rng.uniform(x1, x2))
            cv2.rectangle(img, _ip(px, y1 - bh * 0.2), _ip(px + max(2, bw * rng.uniform(0.04, 0.15)), y2 + bh * 0.1), c,
                          -1)
        else:  # a low bush or railing across the bottom
            top = y2 - bh * rng.uniform(0.12, 0.33)
            cv2.ellipse(img, _ip((x1 + x2) / 2 + rng.uniform(-0.3, 0.3) * bw, y2),
                        (max(2, round(bw * rng.uniform(0.2, 0.5))), max(2, round(y2 - top))), 0, 180, 360, c, -1,
                        cv2.LINE_AA)


def _camera(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Exposure, colour cast, gamma, vignette, blur, noise: float32 in, uint8 out."""
    h, w = img.shape[:2]
    img = img * rng.uniform(0.88, 1.12, 3).astype(np.float32) * np.float32(rng.uniform(0.7, 1.25))
    gamma = float(rng.uniform(0.8, 1.25))
    img = 255.0 * (np.clip(img, 0, 255) / 255.0) ** gamma
    if rng.random() < 0.5:
        yy, xx = np.ogrid[0:h, 0:w]
        d = ((xx - w / 2) / w) ** 2 + ((yy - h / 2) / h) ** 2
        img *= (1.0 - float(rng.uniform(0.1, 0.7)) * d.astype(np.float32))[..., None]
    blur = rng.random()
    if blur < 0.3:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.5, 1.8)))
    elif blur < 0.4:  # horizontal motion blur
        k = int(rng.integers(3, 8))
        img = cv2.filter2D(img, -1, np.full((1, k), 1.0 / k, np.float32))
    img += rng.normal(0.0, rng.uniform(1.0, 10.0), img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def generate_scene(seed: int, *, width: int | None = None, height: int | None = None) -> Scene:
    """One deterministic scene. ``width``/``height`` fix the canvas (e.g. 1280×720 for benchmarks)."""
    rng = np.random.default_rng([seed, STREAM])
    w = width or int(rng.integers(MIN_W, MAX_W + 1))
    aspect = rng.uniform(1.2, 2.0) if rng.random() < 0.8 else rng.uniform(0.75, 1.2)  # mostly landscape
    h = height or int(np.clip(w / aspect, MIN_H, MAX_H))
    img = _background(rng, w, h)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    top_h = min(MAX_OBJ_H, 0.4 * h)
    placed: list[tuple[float, tuple[float, float, float, float], dict]] = []
    for _ in range(n * 4):  # placement attempts; objects that would hide others too much are skipped
        if len(placed) == n:
            break
        class_id, label, vtype = draw_class(rng)
        aspect = ASPECT[vtype or label] * rng.uniform(0.85, 1.15)
        # Scale: log-uniform, so small objects are as common as large ones.
        oh = float(np.exp(rng.uniform(np.log(MIN_OBJ_H), np.log(max(top_h, MIN_OBJ_H + 1)))))
        oh = min(oh, 0.9 * h, 0.9 * w / aspect)
        ow = oh * aspect
        ox = float(rng.uniform(0, w - ow))
        oy = float(rng.uniform(0, h - oh))
        box = (ox, oy, ox + ow, oy + oh)
        if crowds(box, [p[1] for p in placed]):
            continue
        color = COLORS[int(rng.integers(8))]
        light = float(rng.uniform(0.8, 1.1))
        look = {"shade": float(rng.uniform(1.05, 1.25)) if rng.random() < 0.5 else 0.0,
                "band": float(rng.uniform(0.2, 0.45)),
                "outline": int(rng.integers(1, 3)) if rng.random() < 0.4 else 0}
        style = {"label": label, "vtype": vtype, "color": color,
                 "rgb": _scale(_jitter(rng, PALETTE_RGB[color]), light), "facing_right": bool(rng.random() < 0.5),
                 "shape": int(rng.integers(7)), "look": look}
        placed.append((oy + oh, box, style))
    placed.sort(key=lambda p: p[0])  # far (higher up) objects first so nearer ones occlude them
    objects = []
    for _, (x1, y1, x2, y2), s in placed:
        bw, bh = x2 - x1, y2 - y1
        if s["label"] == "car":
            _draw_car(img, x1, y1, bw, bh, s["vtype"], s["rgb"], s["facing_right"], rng, s["look"])
        elif s["label"] == "bicycle":
            _draw_bicycle(img, x1, y1, bw, bh, s["rgb"], rng, s["look"])
        elif s["label"] == "person":
            _draw_person(img, x1, y1, bw, bh, s["rgb"], rng, s["look"])
        else:
            _draw_sign(img, x1, y1, bw, bh, s["rgb"], s["shape"], rng, s["look"])
        objects.append(SceneObject(CLASSES.index(s["label"]), s["label"],
                                   (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2)), s["color"], s["vtype"]))
    _occluders(rng, img, [p[1] for p in placed])
    out = _camera(rng, img)
    return encode(seed, out, int(rng.integers(MIN_QUALITY, MAX_QUALITY + 1)), objects)


def main() -> None:
    cli(__doc__, generate_scene, 100_000)


if __name__ == "__main__":
    main()
