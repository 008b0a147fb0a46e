"""Header checks, and the DALI pipelines against an OpenCV reference (the recipe's preprocessing)."""

from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest

from infer_server.stage.model_repo import InputSpec
from infer_server.stage.preprocess import (
    CORRUPT,
    CropPreprocessor,
    DetectorPreprocessor,
    ImageRejected,
    check_image,
    crop_rois,
    read_header,
)


def scene_rgb(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth street-like picture: coloured rectangles on a gradient (JPEG-friendly, no noise)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    img = (rng.uniform(60, 200, 3) * (1 - t) + rng.uniform(40, 160, 3) * t) * np.ones((1, width, 1))
    img = img.astype(np.uint8)
    for _ in range(12):
        x, y = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        w, h = int(rng.integers(20, width // 3)), int(rng.integers(20, height // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        cv2.rectangle(img, (x, y), (x + w, y + h), color, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def jpeg(rgb: np.ndarray, *flags: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92, *flags])
    assert ok
    return buf.tobytes()


def png(rgb: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    assert ok
    return buf.tobytes()


def decode_rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


IMAGES = [scene_rgb(w, h, s) for s, (w, h) in enumerate([(640, 360), (1000, 562), (300, 500)])]


# --------------------------------------------------------------------------------------- headers
@pytest.mark.parametrize(
    ("data", "fmt"),
    [
        (jpeg(IMAGES[1]), "jpeg"),
        (jpeg(IMAGES[1], cv2.IMWRITE_JPEG_PROGRESSIVE, 1), "jpeg"),  # SOF2
        (png(IMAGES[1]), "png"),
    ],
)
def test_header_gives_format_and_size(data: bytes, fmt: str) -> None:
    assert (read_header(data).format, read_header(data).width, read_header(data).height) == (fmt, 1000, 562)


def test_header_of_a_grayscale_jpeg() -> None:
    ok, buf = cv2.imencode(".jpg", np.full((7, 9), 128, np.uint8))
    assert ok and read_header(buf.tobytes()).width == 9 and read_header(buf.tobytes()).height == 7


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty image"),
        (b"GIF89a" + bytes(100), "not a JPEG or PNG"),
        (b"BM" + bytes(100), "not a JPEG or PNG"),
        (b"hello, world", "not a JPEG or PNG"),
        (jpeg(IMAGES[0])[:40], CORRUPT),  # cut inside the header segments
        (b"\xff\xd8\xff\xda\x00\x08" + bytes(20), CORRUPT),  # scan before any frame header
        (png(IMAGES[0])[:20], CORRUPT),
    ],
)
def test_header_rejects_what_is_not_a_jpeg_or_png(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejected, match=reason):
        read_header(data)


def with_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its SOF0 frame header claiming another size."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def test_pixel_limit_is_checked_from_the_header() -> None:
    bomb = with_jpeg_size(jpeg(IMAGES[0]), 9000, 9000)
    with pytest.raises(ImageRejected, match="9000x9000 exceeds the 40000000 pixel limit"):
        check_image(bomb, 40_000_000)
    png_bomb = bytearray(png(IMAGES[0]))
    png_bomb[16:24] = struct.pack(">II", 20000, 20000)
    with pytest.raises(ImageRejected, match="20000x20000 exceeds"):
        check_image(bytes(png_bomb), 40_000_000)
    assert check_image(jpeg(IMAGES[0]), 640 * 360).width == 640  # exactly at the limit is fine


# --------------------------------------------------------------------------- detector pipeline
def reference_input(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The recipe's preprocessing: INTER_AREA resize, then (pixel * scale - mean) / std, CHW."""
    small = cv2.resize(rgb, (spec.width, spec.height), interpolation=cv2.INTER_AREA).astype(np.float32)
    if spec.color == "bgr":
        small = small[:, :, ::-1]
    out = (small * spec.scale - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    return out.transpose(2, 0, 1)


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(width=416, height=416),
        InputSpec(width=320, height=192, color="bgr", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ],
)
def test_detector_pipeline_matches_the_opencv_reference(spec: InputSpec) -> None:
    pre = DetectorPreprocessor(spec, batch_size=4)
    encoded = [jpeg(img) for img in IMAGES]
    batch = pre.run(encoded)
    assert batch.ok == [0, 1, 2] and not batch.errors
    assert batch.tensor.shape == (3, 3, spec.height, spec.width) and batch.tensor.dtype == np.float32
    assert batch.sizes == [(640, 360), (1000, 562), (300, 500)]
    value_range = float(np.mean(spec.std))  # one 8-bit level is scale / std in model units
    for k, data in enumerate(encoded):
        original = decode_rgb(data)
        decoded = np.asarray(batch.originals[k])  # in the model's channel order; same libjpeg-turbo
        np.testing.assert_array_equal(decoded, original[:, :, ::-1] if spec.color == "bgr" else original)
        diff = np.abs(batch.tensor[k] - reference_input(original, spec)) / (spec.scale / value_range)
        assert diff.mean() < 1.0, "mean error over one 8-bit level"
        assert np.percentile(diff, 99) < 10.0, "edges differ: DALI antialiases with a triangle filter"


def test_corrupt_images_fail_alone_and_neighbours_still_decode() -> None:
    pre = DetectorPreprocessor(InputSpec(width=416, height=416), batch_size=5)
    good = [jpeg(img) for img in IMAGES]
    truncated = good[1][: len(good[1]) // 3]
    garbage = good[0][:300] + bytes(range(256)) * 8  # a valid header, then noise
    batch = pre.run([good[0], truncated, good[1], garbage, good[2]])
    assert batch.errors == {1: CORRUPT, 3: CORRUPT}
    assert batch.ok == [0, 2, 4]
    alone = pre.run(good)
    np.testing.assert_allclose(batch.tensor, alone.tensor)
    assert batch.sizes == alone.sizes


def test_png_decodes_like_jpeg() -> None:
    pre = DetectorPreprocessor(InputSpec(width=64, height=64), batch_size=2)
    batch = pre.run([png(IMAGES[0])])
    np.testing.assert_array_equal(np.asarray(batch.originals[0]), IMAGES[0])


# ------------------------------------------------------------------------------- crop pipeline
def test_crop_rois_pad_round_outwards_and_clip() -> None:
    boxes = np.array([[10.2, 20.7, 30.5, 40.0], [0.0, 0.0, 100.0, 50.0], [95.0, 45.0, 99.5, 49.9]])
    starts, ends = crop_rois(boxes, np.array([[100, 50]] * 3), padding=0.1)
    # box 0: 20.3 x 19.3 → pad 2.03 / 1.93 → x 8.17..32.53 → 8..33, y 18.77..41.93 → 18..42
    np.testing.assert_array_equal(starts, [[18, 8], [0, 0], [44, 94]])
    np.testing.assert_array_equal(ends, [[42, 33], [50, 100], [50, 100]])


def reference_crop(rgb: np.ndarray, box: np.ndarray, padding: float, size: int) -> np.ndarray:
    """The recipe's training crop: padded box on whole pixels, INTER_AREA down / LINEAR up."""
    h, w = rgb.shape[:2]
    pw, ph = (box[2] - box[0]) * padding, (box[3] - box[1]) * padding
    xa, ya = int(max(0, np.floor(box[0] - pw))), int(max(0, np.floor(box[1] - ph)))
    xb, yb = int(min(w, np.ceil(box[2] + pw))), int(min(h, np.ceil(box[3] + ph)))
    patch = rgb[ya:yb, xa:xb]
    interp = cv2.INTER_AREA if patch.shape[0] > size else cv2.INTER_LINEAR
    return cv2.resize(patch, (size, size), interpolation=interp).astype(np.float32).transpose(2, 0, 1) / 255.0


@pytest.mark.parametrize("padding", [0.0, 0.2])
def test_crop_pipeline_matches_the_opencv_reference(padding: float) -> None:
    det = DetectorPreprocessor(InputSpec(width=416, height=416), batch_size=3)
    encoded = [jpeg(img) for img in IMAGES]
    batch = det.run(encoded)
    owners = np.array([0, 0, 1, 1, 1, 2])
    boxes = np.array(
        [[10, 20, 110, 60], [600.5, 300.2, 639.0, 359.0], [100, 100, 900, 500], [0, 0, 30, 30],
         [200, 50, 260, 400], [20, 300, 280, 480]], np.float32,
    )  # fmt: skip
    crops = CropPreprocessor(InputSpec(width=64, height=64), padding=padding, batch_size=4)
    out = list(crops.batches(batch.originals, batch.sizes, owners, boxes))
    assert [rows for rows, _ in out] == [slice(0, 4), slice(4, 6)]
    tensor = np.concatenate([t for _, t in out])
    assert tensor.shape == (6, 3, 64, 64) and tensor.dtype == np.float32
    unpadded_error = []
    for k, (owner, box) in enumerate(zip(owners, boxes, strict=True)):
        rgb = decode_rgb(encoded[owner])
        diff = np.abs(tensor[k] - reference_crop(rgb, box, padding, 64)) * 255
        assert diff.mean() < 1.5, f"crop {k}: mean error {diff.mean():.2f} levels"
        unpadded_error.append(np.abs(tensor[k] - reference_crop(rgb, box, 0.0, 64)).mean() * 255)
    if padding:  # the padding really widened the crops: they no longer match unpadded ones
        assert np.mean(unpadded_error) > 5.0


def test_crop_pipeline_can_swap_to_the_classifiers_channel_order() -> None:
    det = DetectorPreprocessor(InputSpec(width=64, height=64), batch_size=1)
    batch = det.run([jpeg(IMAGES[0])])
    box = np.array([[100, 50, 300, 250]], np.float32)
    rgb = CropPreprocessor(InputSpec(width=32, height=32), batch_size=1)
    bgr = CropPreprocessor(InputSpec(width=32, height=32, color="bgr"), batch_size=1)
    (_, a), (_, b) = (
        next(rgb.batches(batch.originals, batch.sizes, [0], box)),
        next(bgr.batches(batch.originals, batch.sizes, [0], box)),
    )
    np.testing.assert_allclose(a[0, ::-1], b[0], atol=1e-6)


def test_a_tiny_jpeg_that_declares_a_huge_frame_is_refused() -> None:
    """Finding: 64 JPEGs of 39 KiB claiming 6000x6600 took 60 s of both workers and 1.5 GB each."""
    small = jpeg(IMAGES[0])
    liar = with_jpeg_size(small + bytes(39 * 1024 - len(small)), 6000, 6600)  # 39 KiB, 39.6 MP
    with pytest.raises(ImageRejected, match=r"6000x6600 in 39936 bytes is not a real JPEG"):
        check_image(liar, 40_000_000)
    black = cv2.imencode(".jpg", np.zeros((2160, 3840, 3), np.uint8))[1].tobytes()
    assert check_image(black, 40_000_000).width == 3840, "a flat 4K frame is a real JPEG"


def progressive_with_scans(extra: int) -> bytes:
    """A real progressive JPEG with its last scan repeated ``extra`` more times before EOI."""
    data = cv2.imencode(".jpg", IMAGES[0], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    last = data.rindex(b"\xff\xda")
    return data[:-2] + data[last:-2] * extra + b"\xff\xd9"


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused() -> None:
    """Finding: a 1.4 MB progressive JPEG whose scan repeats 20,000 times held a worker ~90 s."""
    normal = progressive_with_scans(0)
    header = check_image(normal, 40_000_000)
    assert header.progressive
    with pytest.raises(ImageRejected, match=r"progressive JPEG with \d+ scans \(at most 100\)"):
        check_image(progressive_with_scans(200), 40_000_000)
