"""Reference profiles, the population stability index and the drift watch's sliding window."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from infer_server.front.drift import DriftMonitor
from infer_server.messages import AttributeRecord, Box, Code, DetectionRecord, ImageOutcome, ImageRef
from infer_server.profile import Reference, build_profile, load_profile, observe

ENGINES = Path(__file__).resolve().parents[2] / "engines" / "models"


def image(brightness: float, labels: tuple[str, ...] = ("car",), width: int = 640) -> ImageOutcome:
    detections = tuple(
        DetectionRecord(0, label, 0.5 + 0.1 * i, Box(0, 0, 10, 10), (AttributeRecord("color", "red", 0.9),))
        for i, label in enumerate(labels)
    )
    return ImageOutcome("b", 0, "x", width=width, height=480, detections=detections,
                        input_stats=(brightness, 40.0))  # fmt: skip


def test_an_image_gives_every_statistic_and_a_failed_one_none() -> None:
    seen = observe(image(100.0, ("car", "person")))
    assert seen["brightness"] == [100.0] and seen["aspect"] == [640 / 480] and seen["detections"] == ["2"]
    assert seen["class"] == ["car", "person"] and seen["attribute:color"] == ["red", "red"]
    assert observe(ImageOutcome.failed("b", ImageRef(0, 0, 1), Code.INVALID_ARGUMENT, "bad")) == {}


def test_deciles_bin_continuous_values_and_a_constant_is_one_bin() -> None:
    spread = Reference.of("brightness", list(range(100)))
    assert len(spread.edges or []) == 9 and all(abs(s - 0.1) < 0.02 for s in spread.shares.values())
    constant = Reference.of("width", [640] * 50)
    assert constant.edges == [640.0] and constant.shares == {"0": 0.0, "1": 1.0}
    assert constant.bin(320) == "0" and constant.bin(640) == "1"


def test_psi_is_near_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = random.Random(1)
    reference = Reference.of("brightness", [rng.gauss(110, 15) for _ in range(2000)])

    def psi(values: list[float]) -> float:
        counts: dict[str, int] = {}
        for v in values:
            counts[reference.bin(v)] = counts.get(reference.bin(v), 0) + 1
        return reference.psi(counts)

    assert psi([rng.gauss(110, 15) for _ in range(500)]) < 0.1
    assert psi([rng.gauss(60, 15) for _ in range(500)]) > 1.0  # a darker stream


def test_a_profile_round_trips_through_json() -> None:
    profile = build_profile([image(100.0 + i) for i in range(30)], "unit")
    loaded = load_profile(json.dumps(profile))
    assert profile["images"] == 30 and set(loaded) >= {"brightness", "class", "attribute:color"}
    with pytest.raises(ValueError):
        load_profile("{not json")


def test_the_window_slides_and_a_flag_turns_on_and_off() -> None:
    profile = json.dumps(build_profile([image(100.0 + (i % 20)) for i in range(200)], "unit"))
    monitor = DriftMonitor(window=50, threshold=0.25, min_images=20)
    monitor.use(profile, ("detector", "1"))
    for i in range(60):
        monitor.observe(image(100.0 + (i % 20)))
    monitor.evaluate()
    assert monitor.images == 50 and not monitor.flagged, monitor.scores
    for _ in range(50):
        monitor.observe(image(30.0))  # dark: the whole window is new now
    monitor.evaluate()
    assert monitor.scores["brightness"].flagged and not monitor.scores["class"].flagged
    for i in range(50):
        monitor.observe(image(100.0 + (i % 20)))
    monitor.evaluate()
    assert not monitor.flagged, "the dark images left the window"


def test_another_profile_starts_a_fresh_window_and_no_profile_no_watch() -> None:
    profile = json.dumps(build_profile([image(100.0)] * 30, "unit"))
    monitor = DriftMonitor(window=50)
    monitor.use(profile, ("detector", "1"))
    monitor.observe(image(100.0))
    monitor.use(profile, ("detector", "2"))
    assert monitor.images == 0
    monitor.use("", ("detector", "3"))
    monitor.observe(image(100.0))
    assert not monitor.enabled and monitor.images == 0


def test_the_main_process_judges_every_shards_window() -> None:
    """A shard that saw only dark images flags the server, though the main process's own window
    is in line; a shard binned for another detector version is left out. The windows together
    (60 images) are judged as one window (50) in their proportions."""
    profile = json.dumps(build_profile([image(100.0 + (i % 20)) for i in range(200)], "unit"))
    main, shard, stale = (DriftMonitor(window=50, threshold=0.25, min_images=50) for _ in range(3))
    for monitor, version in ((main, "1"), (shard, "1"), (stale, "0")):
        monitor.use(profile, ("detector", version))
    for i in range(30):
        main.observe(image(100.0 + (i % 20)))
        shard.observe(image(30.0))
        stale.observe(image(100.0 + (i % 20)))
    main.evaluate([stale.export()])
    assert main.images == 30 and not main.scores, "too few images with the stale shard's left out"
    exported = json.loads(json.dumps(shard.export()))  # as it crosses the link
    main.evaluate([exported, stale.export()])
    assert main.images == 50 and main.scores["brightness"].flagged
    union: dict[str, float] = {}
    for part in (main.export(), exported):
        for key, n in part["counts"]["brightness"].items():
            union[key] = union.get(key, 0) + n * 50 / 60
    assert main.scores["brightness"].psi == pytest.approx(main.references["brightness"].psi(union))


def test_the_shipped_detector_has_a_profile() -> None:
    shipped = load_profile((ENGINES / "detector" / "profile.json").read_text())
    assert {"brightness", "contrast", "confidence", "class", "detections", "attribute:color"} <= set(shipped)
