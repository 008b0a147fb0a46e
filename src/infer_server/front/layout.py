"""A push's layout, checked before anything is opened: one source (a path or inline data), one to
``max_images`` sizes, each above zero, adding up to at most ``max_bytes``, names within their
limit. ``front.handoff`` then opens (or stages) what a layout that passed describes.

This runs on the event loop for every push, so the common case — every size and name fine — is
checked with one pass of builtins per rule (``min`` and ``accumulate`` over the sizes, ``any``
over the names, if there are any) and the images' records are made without their ``__init__``;
a request that breaks any rule is walked image by image to name the first image that breaks
one, as the error has always said.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate, repeat

from infer_server.front.errors import InvalidBatch
from infer_server.messages import ImageRef, image_refs


@dataclass(frozen=True)
class HandoffLimits:
    """The per-batch limits of ``ServerSettings`` that the handoff checks (the defaults live there)."""

    max_images: int
    max_bytes: int
    max_name_bytes: int
    max_path_bytes: int


@dataclass(frozen=True)
class BatchPlan:
    """A request whose layout passed the cheap checks; nothing has been opened yet."""

    images: tuple[ImageRef, ...]
    total_bytes: int
    path: str | None
    data: bytes | None


def too_long(text: str, limit: int) -> bool:
    """More than ``limit`` bytes of UTF-8 (a character is 1 to 4 bytes: most texts need no encoding)."""
    return len(text) > limit or (4 * len(text) > limit and len(text.encode("utf-8", "surrogatepass")) > limit)


def plan_batch(limits: HandoffLimits, path: str, data: bytes, sizes: Sequence[int], names: Sequence[str]) -> BatchPlan:
    """Check the request's layout: one source, 1..max images, sizes > 0, total within limits."""
    if path and data:
        raise InvalidBatch("send either 'path' or 'data', not both")
    if not path and not data:
        raise InvalidBatch("a batch needs either 'path' or 'data'")
    if path and too_long(path, limits.max_path_bytes):  # before anything reads the path
        raise InvalidBatch(f"path is longer than {limits.max_path_bytes} bytes")
    count = len(sizes)  # len() first: the sizes list itself may be huge
    if count == 0:
        raise InvalidBatch("a batch needs at least one image size")
    if count > limits.max_images:
        raise InvalidBatch(f"a batch holds at most {limits.max_images} images, got {count}")
    if names and len(names) != count:
        raise InvalidBatch(f"got {len(names)} names for {count} images")
    offsets = list(accumulate(sizes, initial=0))  # Python ints: no overflow however large the uint64 sizes are
    total = offsets.pop()
    long_name = bool(names) and any(too_long(name, limits.max_name_bytes) for name in names)
    if min(sizes) <= 0 or total > limits.max_bytes or long_name:
        _first_broken(limits, sizes, names)
    if data and len(data) != total:
        raise InvalidBatch(f"sizes add up to {total} bytes but data holds {len(data)}")
    refs = image_refs(zip(range(count), offsets, sizes, names or repeat(""), strict=False))
    return BatchPlan(tuple(refs), total, path or None, data or None)


def _first_broken(limits: HandoffLimits, sizes: Sequence[int], names: Sequence[str]) -> None:
    """Raise for the first image that breaks a rule, checked in the order the rules are listed."""
    offset = 0
    for index, size in enumerate(sizes):
        if size <= 0:
            raise InvalidBatch(f"image {index} has size 0")
        if offset + size > limits.max_bytes:
            raise InvalidBatch(f"a batch holds at most {limits.max_bytes} bytes")
        if names and too_long(names[index], limits.max_name_bytes):
            raise InvalidBatch(f"name of image {index} is longer than {limits.max_name_bytes} bytes")
        offset += size
    raise AssertionError("a layout the fast check refused breaks no rule")  # pragma: no cover
