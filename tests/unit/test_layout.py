"""A push's layout (``front.layout``): the fast check of the common case answers exactly what the
image-by-image walk does — the same records, or the same error naming the same first image."""

from __future__ import annotations

import random

import pytest

from infer_server.front.errors import InvalidBatch
from infer_server.front.layout import HandoffLimits, plan_batch, too_long
from infer_server.messages import ImageRef

LIMITS = HandoffLimits(max_images=8, max_bytes=1000, max_name_bytes=6, max_path_bytes=64)


def walked(limits: HandoffLimits, path: str, data: bytes, sizes: list[int], names: list[str]) -> tuple:  # type: ignore[type-arg]
    """The per-image rules checked one image at a time (what the server did before the fast check;
    the count rules come before either and are asserted in ``tests/unit/test_handoff.py``)."""
    refs, offset = [], 0
    for index, size in enumerate(sizes):
        if size <= 0:
            raise InvalidBatch(f"image {index} has size 0")
        if offset + size > limits.max_bytes:
            raise InvalidBatch(f"a batch holds at most {limits.max_bytes} bytes")
        name = names[index] if names else ""
        if name and too_long(name, limits.max_name_bytes):
            raise InvalidBatch(f"name of image {index} is longer than {limits.max_name_bytes} bytes")
        refs.append(ImageRef(index=index, offset=offset, size=size, name=name))
        offset += size
    if data and len(data) != offset:
        raise InvalidBatch(f"sizes add up to {offset} bytes but data holds {len(data)}")
    return tuple(refs), offset


def answer(check, *args):  # type: ignore[no-untyped-def]
    try:
        return check(*args)
    except InvalidBatch as exc:
        return ("refused", str(exc))


def test_random_layouts_get_the_walks_answer() -> None:
    rng = random.Random(17)
    for _ in range(3000):
        count = rng.choice([1, 2, 3, 8, 8])  # within the count rules: the per-image ones are under test
        sizes = [rng.choice([0, 1, 5, 100, 300, 999, 1000, 1001]) if rng.random() < 0.3 else rng.randint(1, 120)
                 for _ in range(count)]  # fmt: skip
        names = [] if rng.random() < 0.5 else [rng.choice(["", "a", "né", "abcdef", "abcdefg", "ééé", "éééé"])
                                               for _ in range(count)]  # fmt: skip
        data = b"" if rng.random() < 0.7 else b"x" * (sum(sizes) + rng.choice([0, 0, 1]))
        path = "" if data else "b.bin"
        got = answer(plan_batch, LIMITS, path, data, sizes, names)
        expected = answer(walked, LIMITS, path, data, sizes, names)
        if isinstance(expected, tuple) and expected[0] == "refused":
            assert got == expected, (sizes, names)
        else:
            assert (got.images, got.total_bytes) == expected, (sizes, names)
            assert all(type(ref) is ImageRef for ref in got.images)
            assert got.path == (path or None) and got.data == (data or None)


@pytest.mark.parametrize(
    ("sizes", "names", "message"),
    [
        ([5, 0, 2000], [], "image 1 has size 0"),  # the first broken image, whichever rule comes later
        ([600, 500, 0], [], "a batch holds at most 1000 bytes"),
        ([5, 5], ["ok", "toolong!"], "name of image 1 is longer than 6 bytes"),
        ([5, 0], ["toolong!", "ok"], "name of image 0 is longer than 6 bytes"),
        ([5, 5], ["ok", "éééé"], "name of image 1 is longer than 6 bytes"),  # 8 bytes of UTF-8 in 4 characters
    ],
)
def test_the_first_image_that_breaks_a_rule_is_named(sizes: list[int], names: list[str], message: str) -> None:
    with pytest.raises(InvalidBatch) as refused:
        plan_batch(LIMITS, "b.bin", b"", sizes, names)
    assert str(refused.value) == message


def test_huge_sizes_are_refused_not_wrapped() -> None:
    with pytest.raises(InvalidBatch, match="at most 1000 bytes"):
        plan_batch(LIMITS, "b.bin", b"", [2**64 - 1, 2**64 - 1], [])
