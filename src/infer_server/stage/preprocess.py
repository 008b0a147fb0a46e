"""Image preprocessing of a stage worker: header checks, DALI decode/resize/normalise, box crops.

Runs inside a stage worker process (``infer_server.stage.worker`` via ``infer_server.stage.pipeline``); nothing
here is used by the gRPC front. Three steps, in the order the worker calls them:

1. ``check_image`` reads the header of each image's bytes *before* DALI sees them: JPEG or PNG by
   magic bytes, width and height from the SOFn marker / IHDR chunk, and a pixel-count limit, so a
   decompression bomb is refused without allocating its pixels. A JPEG must also be a plausible
   encoding of what it declares: at most ``MAX_JPEG_PIXELS_PER_BYTE`` declared pixels per byte of
   data (a few kilobytes claiming tens of megapixels decode for seconds into garbage), and a
   progressive one at most ``MAX_JPEG_SCANS`` scans (each scan is a pass over the whole image).
2. ``DetectorPreprocessor`` runs ``detector_pipeline``: decode → resize to the detector input
   (linear with antialiasing, the match of the recipe's INTER_AREA downscale) → ``(pixel * scale -
   mean) / std`` → CHW float32, and keeps the decoded original for the crops. DALI fails a whole
   batch when one image is corrupt; the batch is then decoded image by image so only the bad ones
   become per-image errors.
3. ``CropPreprocessor`` runs ``crop_pipeline``: one ROI resize per detection box (with the
   classifier's ``crop_padding``) straight from the decoded original, normalised like step 2.

The device is a pipeline parameter ('cpu' or 'gpu'); on 'gpu' decoding is 'mixed' and the tensors
handed to the engines stay on the device (DALI ``TensorGPU``), on 'cpu' they are NumPy arrays.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.backend import TensorListGPU

from infer_server.stage.model_repo import InputSpec

CORRUPT = "corrupt or truncated image data"
# No JPEG a camera or an encoder writes comes near this: an all-black frame from libjpeg is ~63
# pixels per byte, and even hand-made 1-bit Huffman codes for every flat block stay under ~260
# (baseline); only such a hand-made, all-flat progressive file could pass it.
MAX_JPEG_PIXELS_PER_BYTE = 512
# Encoders write ~10 scans for a progressive JPEG; each one more is a pass over every block.
MAX_JPEG_SCANS = 100
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOFn markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field (TEM, RSTn); SOI/EOI are handled explicitly.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


# DALI names the failing operator in its error; only the decoder's failures are the image's fault.
_DECODER_OP = "decoders.image"


class ImageRejected(ValueError):
    """An image refused before or during decoding; ``str()`` is the client-facing reason."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # "jpeg" or "png"
    width: int
    height: int
    progressive: bool = False  # a progressive JPEG (several scans over the whole image)


def read_header(data: bytes | memoryview) -> ImageHeader:
    """Format and size from the first bytes of an encoded image; raise ``ImageRejected``."""
    if not data:
        raise ImageRejected("empty image")
    if data[: len(_PNG_MAGIC)] == _PNG_MAGIC:
        # The IHDR chunk must come first: length 13, type, width, height (big endian).
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageRejected(CORRUPT)
        width, height = struct.unpack(">II", data[16:24])
        return _checked(ImageHeader("png", width, height))
    if data[:3] == b"\xff\xd8\xff":
        return _checked(_jpeg_header(data))
    raise ImageRejected("not a JPEG or PNG")


def _jpeg_marker(data: bytes | memoryview, pos: int) -> tuple[int, int] | None:
    """The marker at ``pos`` (after any fill bytes) and the position after it; None at the end."""
    end = len(data)
    if data[pos] != 0xFF:
        raise ImageRejected(CORRUPT)
    while pos < end and data[pos] == 0xFF:  # markers may be preceded by fill bytes
        pos += 1
    if pos >= end:
        return None
    return data[pos], pos + 1


def _jpeg_header(data: bytes | memoryview) -> ImageHeader:
    pos, end = 2, len(data)
    while pos < end:
        found = _jpeg_marker(data, pos)
        if found is None:
            break
        marker, pos = found
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI or start of scan before any frame header
            raise ImageRejected(CORRUPT)
        if pos + 2 > end:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise ImageRejected(CORRUPT)
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                break
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            return ImageHeader("jpeg", width, height, marker in _PROGRESSIVE_SOF)
        pos += length
    raise ImageRejected(CORRUPT)


def _checked(header: ImageHeader) -> ImageHeader:
    if header.width == 0 or header.height == 0:  # e.g. a JPEG that defers its height to a DNL marker
        raise ImageRejected(f"unsupported image size {header.width}x{header.height}")
    return header


def check_image(data: bytes | memoryview, max_pixels: int) -> ImageHeader:
    """``read_header`` plus the decoder's limits; raise ``ImageRejected`` with the reason."""
    header = read_header(data)
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise ImageRejected(f"{header.width}x{header.height} exceeds the {max_pixels} pixel limit")
    if header.format == "jpeg":
        if pixels > MAX_JPEG_PIXELS_PER_BYTE * len(data):
            raise ImageRejected(f"{header.width}x{header.height} in {len(data)} bytes is not a real JPEG")
        if header.progressive and (scans := _jpeg_scans(data)) > MAX_JPEG_SCANS:
            raise ImageRejected(f"progressive JPEG with {scans} scans (at most {MAX_JPEG_SCANS})")
    return header


def _jpeg_scans(data: bytes | memoryview) -> int:
    """Start-of-scan markers: entropy-coded data never holds FF DA (an FF there is followed by 00
    or a restart marker), so every one is a scan (or one of an embedded thumbnail's)."""
    raw = np.frombuffer(data, np.uint8)
    return int(np.count_nonzero((raw[:-1] == 0xFF) & (raw[1:] == 0xDA)))


def _normalize(spec: InputSpec) -> dict[str, list[float]]:
    # crop_mirror_normalize computes (x - mean) / std; folding the scale in gives the config's
    # (x * scale - mean) / std in one pass.
    return {"mean": [m / spec.scale for m in spec.mean], "std": [s / spec.scale for s in spec.std]}


def _dali_device(device: str) -> tuple[str, int | None]:
    if device not in ("cpu", "gpu"):
        raise ValueError(f"unknown device {device!r} (expected 'cpu' or 'gpu')")
    return ("cpu", None) if device == "cpu" else ("gpu", 0)


@pipeline_def(exec_dynamic=True)
def detector_pipeline(
    device: str, width: int, height: int, color: str, mean: list[float], std: list[float]
) -> tuple[Any, Any, Any, Any]:
    """Encoded bytes → (CHW float32 detector input, decoded HWC uint8 original, its shape,
    [brightness, contrast])."""
    encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1, no_copy=True)
    decoded = fn.decoders.image(
        encoded,
        device="mixed" if device == "gpu" else "cpu",
        output_type=types.RGB if color == "rgb" else types.BGR,
    )
    resized = fn.resize(decoded, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=True)
    tensor = fn.crop_mirror_normalize(resized, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
    # Brightness and contrast (mean and standard deviation of the resized pixels, 0..255): what the
    # server's drift watch compares with the model's reference profile (``infer_server.profile``).
    brightness = fn.reductions.mean(resized, dtype=types.FLOAT)
    stats = fn.stack(brightness, fn.reductions.std_dev(resized, brightness))
    return tensor, decoded, decoded.shape(), stats


@pipeline_def(exec_dynamic=True)
def crop_pipeline(
    device: str, width: int, height: int, swap_channels: bool, mean: list[float], std: list[float]
) -> Any:
    """(decoded original, ROI start (y, x), ROI end (y, x)) per box → CHW float32 crop."""
    image = fn.external_source(name="image", device=device, layout="HWC", no_copy=True)
    roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT, ndim=1)
    roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT, ndim=1)
    crop = fn.resize(
        image,
        size=[height, width],
        roi_start=roi_start,
        roi_end=roi_end,
        roi_relative=False,
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
    if swap_channels:  # the classifier wants the other channel order than the detector decoded
        crop = fn.color_space_conversion(crop, image_type=types.RGB, output_type=types.BGR)
    return fn.crop_mirror_normalize(crop, dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)


def _batch_tensor(tl: Any) -> Any:
    """A dense batch for an engine: NumPy on CPU, a DALI TensorGPU (CUDA array) on GPU."""
    return tl.as_tensor() if isinstance(tl, TensorListGPU) else tl.as_array()


def _host(tl: Any) -> np.ndarray:
    return (tl.as_cpu() if isinstance(tl, TensorListGPU) else tl).as_array()


@dataclass
class DecodedBatch:
    """The images of one chunk that decoded, in input order, and the reasons of those that did not."""

    tensor: Any  # [n, 3, H, W] float32 detector input (NumPy or DALI TensorGPU), n = len(ok)
    originals: list[Any]  # decoded HWC uint8 images (DALI tensors on the pipeline's device)
    sizes: list[tuple[int, int]]  # (width, height) of each decoded original
    ok: list[int]  # positions in the input list
    stats: Any = None  # [n, 2] float32: brightness and contrast of each (see ``detector_pipeline``)
    errors: dict[int, str] = field(default_factory=dict)  # position → reason
    keepalive: list[Any] = field(default_factory=list, repr=False)  # owners of ``originals``


class DetectorPreprocessor:
    """Decode + resize + normalise a chunk of encoded images with one DALI pipeline."""

    def __init__(self, spec: InputSpec, *, device: str = "cpu", batch_size: int = 8, num_threads: int = 1):
        self.device, device_id = _dali_device(device)
        self.batch_size = batch_size
        self._pipe = detector_pipeline(
            self.device,
            spec.width,
            spec.height,
            spec.color,
            **_normalize(spec),
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            prefetch_queue_depth=1,
        )
        self._pipe.build()

    def _run(self, encoded: Sequence[bytes | memoryview]) -> tuple[Any, ...]:
        self._pipe.feed_input("encoded", [np.frombuffer(b, np.uint8) for b in encoded])
        return tuple(self._pipe.run())

    def run(self, encoded: Sequence[bytes | memoryview]) -> DecodedBatch:
        """Decode ``encoded`` (at most ``batch_size`` images that passed ``check_image``)."""
        if not encoded:
            return DecodedBatch(np.empty((0,)), [], [], [], np.empty((0, 2), np.float32))
        if len(encoded) > self.batch_size:
            raise ValueError(f"{len(encoded)} images exceed the pipeline batch size {self.batch_size}")
        try:
            tensor, decoded, shapes, stats = self._run(encoded)
        except Exception:  # DALI fails the whole batch for one bad image: find it
            return self._run_one_by_one(encoded)
        dims = _host(shapes)
        return DecodedBatch(
            _batch_tensor(tensor),
            [decoded[i] for i in range(len(encoded))],
            [(int(d[1]), int(d[0])) for d in dims],
            list(range(len(encoded))),
            _host(stats),
            keepalive=[decoded],
        )

    def _run_one_by_one(self, encoded: Sequence[bytes | memoryview]) -> DecodedBatch:
        out = DecodedBatch(None, [], [], [])
        tensors, stats = [], []
        for pos, data in enumerate(encoded):
            try:
                tensor, decoded, shapes, image_stats = self._run([data])
            except Exception as exc:
                if _DECODER_OP not in str(exc):
                    raise  # not the image's fault (e.g. out of memory): the chunk fails as a whole
                out.errors[pos] = CORRUPT
                continue
            d = _host(shapes)[0]
            tensors.append(_host(tensor))  # the rare path: assemble the batch on the host
            stats.append(_host(image_stats))
            out.originals.append(decoded[0])
            out.keepalive.append(decoded)
            out.sizes.append((int(d[1]), int(d[0])))
            out.ok.append(pos)
        out.tensor = np.concatenate(tensors) if tensors else np.empty((0,))
        out.stats = np.concatenate(stats) if stats else np.empty((0, 2), np.float32)
        return out


def crop_rois(boxes: np.ndarray, sizes: np.ndarray, padding: float) -> tuple[np.ndarray, np.ndarray]:
    """ROI (y, x) start/end per box: box + ``padding`` × its size on each side, on whole pixels.

    ``boxes`` are [K, 4] x1, y1, x2, y2 in original pixels and ``sizes`` [K, 2] (width, height) of
    each box's image. Rounding outwards to whole pixels matches the recipe's training crops.
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = np.asarray(sizes, np.float64).reshape(-1, 2).T
    pw, ph = (boxes[:, 2] - boxes[:, 0]) * padding, (boxes[:, 3] - boxes[:, 1]) * padding
    x1 = np.clip(np.floor(boxes[:, 0] - pw), 0, w - 1)
    y1 = np.clip(np.floor(boxes[:, 1] - ph), 0, h - 1)
    x2 = np.maximum(np.minimum(np.ceil(boxes[:, 2] + pw), w), x1 + 1)
    y2 = np.maximum(np.minimum(np.ceil(boxes[:, 3] + ph), h), y1 + 1)
    return np.stack([y1, x1], 1).astype(np.float32), np.stack([y2, x2], 1).astype(np.float32)


class CropPreprocessor:
    """Crop + resize + normalise detection boxes for one classifier input spec."""

    def __init__(
        self,
        spec: InputSpec,
        *,
        source_color: str = "rgb",
        padding: float = 0.0,
        device: str = "cpu",
        batch_size: int = 64,
        num_threads: int = 1,
    ):
        self.device, device_id = _dali_device(device)
        self.padding = padding
        self.batch_size = batch_size
        self._pipe = crop_pipeline(
            self.device,
            spec.width,
            spec.height,
            spec.color != source_color,
            **_normalize(spec),
            batch_size=batch_size,
            num_threads=num_threads,
            device_id=device_id,
            prefetch_queue_depth=1,
        )
        self._pipe.build()

    def batches(
        self,
        originals: Sequence[Any],
        sizes: Sequence[tuple[int, int]],
        owners: np.ndarray,
        boxes: np.ndarray,
    ) -> Iterator[tuple[slice, Any]]:
        """Yield ``(rows, tensor)``: crops of ``boxes[rows]`` ([n, 3, h, w] float32), in order.

        ``owners[k]`` is the index into ``originals``/``sizes`` of the image box ``k`` lies in.
        """
        owners = np.asarray(owners, np.int64)
        starts, ends = crop_rois(boxes, np.asarray(sizes, np.float64).reshape(-1, 2)[owners], self.padding)
        for lo in range(0, len(owners), self.batch_size):
            rows = slice(lo, min(lo + self.batch_size, len(owners)))
            # The same decoded image is fed once per box without copying (no_copy); DALI reads the
            # ROI straight from it.
            self._pipe.feed_input("image", [originals[o] for o in owners[rows]])
            self._pipe.feed_input("roi_start", list(starts[rows]))
            self._pipe.feed_input("roi_end", list(ends[rows]))
            (tensor,) = self._pipe.run()
            yield rows, _batch_tensor(tensor)
