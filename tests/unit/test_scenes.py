"""The scene generator: deterministic from its seed, within the documented ranges, truthful boxes."""

from __future__ import annotations

import json

import cv2
import numpy as np

from engines.scenes import CLASSES, COLORS, VEHICLE_TYPES, generate_scene, write_scenes


def test_same_seed_same_scene_and_different_seed_different_scene() -> None:
    a, b, c = generate_scene(11), generate_scene(11), generate_scene(12)
    assert a.jpeg == b.jpeg and a.objects == b.objects
    assert a.jpeg != c.jpeg


def test_scenes_stay_within_the_documented_ranges() -> None:
    counts = []
    for seed in range(40):
        s = generate_scene(seed)
        assert 640 <= s.width <= 1280 and 360 <= s.height <= 720
        assert 70 <= s.quality <= 95
        assert 1 <= len(s.objects) <= 12
        counts.append(len(s.objects))
        img = cv2.imdecode(np.frombuffer(s.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (s.height, s.width, 3)
        for o in s.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
            assert 31 <= y2 - y1 <= 201
            assert CLASSES[o.class_id] == o.label and o.color in COLORS
            assert (o.vehicle_type in VEHICLE_TYPES) if o.label == "car" else o.vehicle_type is None
    assert max(counts) > 4  # not degenerate


def test_fixed_canvas_and_object_pixels_inside_their_boxes() -> None:
    s = generate_scene(5, width=1280, height=720)
    assert (s.width, s.height) == (1280, 720)
    rgb = s.decode_rgb().astype(np.int16)
    # Each object's box differs from the plain background around it: something was drawn there.
    for o in s.objects:
        x1, y1, x2, y2 = (int(v) for v in o.box)
        patch = rgb[y1:y2, x1:x2]
        assert patch.std() > 8, o


def test_write_scenes_writes_jpegs_and_ground_truth(tmp_path) -> None:  # noqa: ANN001
    path = write_scenes(tmp_path, [3, 4])
    truth = json.loads(path.read_text())
    assert [t["file"] for t in truth] == ["scene_00000.jpg", "scene_00001.jpg"]
    assert (tmp_path / "scene_00001.jpg").read_bytes() == generate_scene(4).jpeg
    assert truth[0]["objects"][0]["box"] == list(generate_scene(3).objects[0].box)


def test_the_held_out_style_is_deterministic_and_truthful() -> None:
    from engines import scenes_alt

    a, b = scenes_alt.generate_scene(950_001), scenes_alt.generate_scene(950_001)
    assert a.jpeg == b.jpeg and a.objects == b.objects
    assert a.jpeg != generate_scene(950_001).jpeg  # not the training style's stream
    for seed in range(950_000, 950_010):
        s = scenes_alt.generate_scene(seed)
        rgb = s.decode_rgb()
        assert rgb.shape == (s.height, s.width, 3) and 1 <= len(s.objects) <= 10
        for o in s.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
            assert CLASSES[o.class_id] == o.label and o.color in COLORS
            assert (o.vehicle_type in VEHICLE_TYPES) if o.label == "car" else o.vehicle_type is None


def test_the_varied_training_style_stays_within_its_documented_ranges() -> None:
    from engines import scenes_varied as v

    a, b = v.generate_scene(100_001), v.generate_scene(100_001)
    assert a.jpeg == b.jpeg and a.objects == b.objects
    assert a.jpeg != generate_scene(100_001).jpeg  # a stream of its own, not the default style's
    counts, aspects = [], []
    for seed in range(100_000, 100_030):
        s = v.generate_scene(seed)
        assert v.MIN_W <= s.width <= v.MAX_W and v.MIN_H <= s.height <= v.MAX_H
        assert v.MIN_QUALITY <= s.quality <= v.MAX_QUALITY and 1 <= len(s.objects) <= v.MAX_OBJECTS
        assert s.decode_rgb().shape == (s.height, s.width, 3)
        counts.append(len(s.objects))
        aspects.append(s.width / s.height)
        for o in s.objects:
            x1, y1, x2, y2 = o.box
            assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
            assert v.MIN_OBJ_H - 1 <= y2 - y1 <= v.MAX_OBJ_H + 1
            assert CLASSES[o.class_id] == o.label and o.color in COLORS
            assert (o.vehicle_type in VEHICLE_TYPES) if o.label == "car" else o.vehicle_type is None
    assert max(counts) > 4 and min(aspects) < 1.2 < 1.8 < max(aspects)  # portrait-ish to wide canvases


def test_scene_references_name_a_style_and_a_seed() -> None:
    import pytest

    from engines.data import describe, generate, refs

    scenes = refs("default", range(3)) + refs("varied", range(100_000, 100_002))
    assert describe(scenes) == "default 0–2 + varied 100000–100001"
    assert generate(("default", 3)).jpeg == generate_scene(3).jpeg
    with pytest.raises(ValueError, match="unknown scene style 'nope'"):
        refs("nope", [1])
