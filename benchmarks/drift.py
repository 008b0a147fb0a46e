"""The drift watch, measured: how often it raises a false alarm on images like the ones the detector
was validated on, and how many shifted images it takes to notice a shift.

The images go through the server's own pipeline (``engines.profile.answers``: DALI decode, the INT8
engines, the attribute models), in process, and their outcomes feed the server's ``DriftMonitor``
with its defaults (window 500, judged from 200 images, PSI threshold 0.25) and the shipped
``engines/models/detector/profile.json``.

* **False alarms** — held-out scenes of the training distribution (default style 900000–, varied
  style 610000–, in turn; nothing trains or validates on them): ``--windows`` windows are drawn
  from their outcomes (with replacement, i.e. fresh samples of the same distribution) and judged;
  the rate is the share of windows with any statistic flagged, and per statistic.
* **Delay** — a window filled with held-out images, then a shifted stream, judged every 10 images:
  how many shifted images until the first flag, and which statistic flagged. Shifts, on other
  held-out scenes of the same mix (default 910000–, varied 620000–): ``dark`` (pixels × 0.5),
  ``blur`` (Gaussian, sigma 3), ``small`` (resized to 320×240); and ``alt``, the held-out drawing
  style (``engines.scenes_alt``, 950000–).

    .venv/bin/python -m benchmarks.drift --json bench-out/drift.json
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
import typer

from engines import scenes, scenes_alt, scenes_varied
from engines.profile import MODELS, answers
from infer_server.front.drift import DriftMonitor
from infer_server.messages import ImageOutcome

WINDOW, MIN_IMAGES, THRESHOLD, STEP = 500, 200, 0.25, 10


def _jpeg(rgb: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    return data.tobytes()


def _decoded(jpeg: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _mixed(i: int, first: tuple[int, int]) -> bytes:
    """Image ``i`` of a stream of held-out scenes: default and varied style in turn (the mix the
    reference was computed on), from seeds ``first``."""
    if i % 2 == 0:
        return scenes.generate_scene(first[0] + i // 2).jpeg
    return scenes_varied.generate_scene(first[1] + i // 2).jpeg


def _held_out(n: int) -> list[bytes]:
    return [_mixed(i, (900_000, 610_000)) for i in range(n)]


def _fresh(i: int) -> np.ndarray:
    """Other held-out scenes of the same mix, for the shifted streams."""
    return _decoded(_mixed(i, (910_000, 620_000)))


SHIFTS: dict[str, Callable[[int], bytes]] = {
    "dark": lambda i: _jpeg((_fresh(i) * 0.5).astype(np.uint8)),
    "blur": lambda i: _jpeg(cv2.GaussianBlur(_fresh(i), (0, 0), 3)),
    "small": lambda i: _jpeg(cv2.resize(_fresh(i), (320, 240), interpolation=cv2.INTER_AREA)),
    "alt": lambda i: scenes_alt.generate_scene(950_000 + i % 300).jpeg,
}


def _monitor() -> DriftMonitor:
    monitor = DriftMonitor(WINDOW, THRESHOLD, MIN_IMAGES)
    monitor.use((MODELS / "detector" / "profile.json").read_text(), ("detector", "1"))
    return monitor


def false_alarms(outcomes: list[ImageOutcome], windows: int, seed: int = 0) -> dict[str, Any]:
    rng = random.Random(seed)
    flagged, per_statistic, worst = 0, dict.fromkeys(_monitor().references, 0), []
    for _ in range(windows):
        monitor = _monitor()
        for outcome in rng.choices(outcomes, k=WINDOW):
            monitor.observe(outcome)
        monitor.evaluate()
        flagged += monitor.flagged
        for name, score in monitor.scores.items():
            per_statistic[name] += score.flagged
        worst.append(max(s.psi for s in monitor.scores.values()))
    return {"windows": windows, "rate": flagged / windows,
            "per_statistic": {k: v / windows for k, v in per_statistic.items()},
            "max_psi_median": float(np.median(worst)), "max_psi_p95": float(np.percentile(worst, 95))}  # fmt: skip


def delay(baseline: list[ImageOutcome], shifted: list[ImageOutcome]) -> dict[str, Any]:
    monitor = _monitor()
    for outcome in baseline[:WINDOW]:
        monitor.observe(outcome)
    monitor.evaluate()
    before = monitor.flagged
    for n, outcome in enumerate(shifted, 1):
        monitor.observe(outcome)
        if n % STEP == 0:
            monitor.evaluate()
            if monitor.flagged:
                first = sorted((s.psi, k) for k, s in monitor.scores.items() if s.flagged)[-1]
                return {"images": n, "flagged_before": before, "statistic": first[1], "psi": first[0]}
    return {"images": None, "flagged_before": before, "statistic": None, "psi": None}


def main(
    held_out: Annotated[int, typer.Option(help="Held-out images of the training distribution.")] = 600,
    shifted: Annotated[int, typer.Option(help="Images per shifted stream (at most).")] = 300,
    windows: Annotated[int, typer.Option(help="Windows drawn for the false-alarm rate.")] = 2000,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
) -> None:
    """Measure the drift watch's false-alarm rate and its delay on shifted streams."""
    t0 = time.time()
    base = list(answers(MODELS, _held_out(held_out)))
    doc: dict[str, Any] = {"window": WINDOW, "min_images": MIN_IMAGES, "threshold": THRESHOLD, "step": STEP,
                           "held_out_images": len(base), "delay": {}}  # fmt: skip
    doc["false_alarms"] = false_alarms(base, windows)
    fa = doc["false_alarms"]
    print(f"false alarms: {fa['rate']:.2%} of {windows} windows of {WINDOW} held-out images "
          f"(max PSI per window: median {fa['max_psi_median']:.3f}, p95 {fa['max_psi_p95']:.3f})")  # fmt: skip
    for name, make in SHIFTS.items():
        outcomes = list(answers(MODELS, (make(i) for i in range(shifted))))
        doc["delay"][name] = found = delay(base, outcomes)
        print(f"{name:>6}: flagged after {found['images']} shifted images ({found['statistic']}, PSI {found['psi']})")
    doc["seconds"] = round(time.time() - t0, 1)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    typer.run(main)
