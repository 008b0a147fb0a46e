"""Draw an ImageResult's boxes and labels onto its image (OpenCV), for ``infer-client --annotate``.

Runs in the client's process; the image is decoded locally from the same file or bytes that were
pushed, so the boxes (original-image pixels) land where the server saw the objects.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from infer_client.results import ImageResult

# BGR colours per class id, cycled for models with more classes.
_PALETTE = ((60, 200, 60), (230, 160, 30), (40, 60, 230), (0, 200, 230), (200, 60, 200), (200, 200, 60))


def decode(image: str | os.PathLike[str] | bytes) -> np.ndarray:
    """BGR pixels of a JPEG/PNG given as a path or encoded bytes; ValueError if undecodable."""
    raw = image if isinstance(image, bytes) else Path(image).read_bytes()
    pixels = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        raise ValueError("image cannot be decoded")
    return pixels


def draw(pixels: np.ndarray, result: ImageResult) -> np.ndarray:
    """A copy of ``pixels`` with every detection's box and ``label score attr...`` caption."""
    out = pixels.copy()
    thickness = max(1, round(min(out.shape[:2]) / 400))
    for det in result.detections:
        color = _PALETTE[det.class_id % len(_PALETTE)]
        x1, y1, x2, y2 = (round(v) for v in det.box.as_tuple())
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
        caption = " ".join([f"{det.label} {det.score:.2f}", *(a.label for a in det.attributes.values())])
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        ty = y1 - 4 if y1 - th - base - 4 >= 0 else y2 + th + 4
        cv2.rectangle(out, (x1, ty - th - 2), (x1 + tw + 2, ty + base), color, -1)
        cv2.putText(out, caption, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return out


def write_annotated(image: str | os.PathLike[str] | bytes, result: ImageResult, path: str | os.PathLike[str]) -> None:
    """Decode ``image``, draw ``result`` on it and save a JPEG at ``path``."""
    if not cv2.imwrite(os.fspath(path), draw(decode(image), result)):
        raise OSError(f"could not write {path}")
