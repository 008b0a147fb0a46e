"""LRU-K: a scan of images seen once never evicts the ones that keep coming back; bounds hold."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from infer_server.front.handoff import BatchFile
from infer_server.front.result_cache import LRUKCache
from infer_server.stage.worker import image_digest


def hit_rate(cache: LRUKCache, trace: list[int]) -> float:
    hits = 0
    for key in trace:
        if cache.get(key) is not None:
            hits += 1
        else:
            cache.put(key, f"result {key}", 100)
    return hits / len(trace)


def test_a_scan_does_not_flush_the_hot_set_under_lru_k_as_it_does_under_lru() -> None:
    rng = random.Random(7)
    hot = list(range(50))
    warm = [rng.choice(hot) for _ in range(2000)]
    scan = list(range(1000, 1500))  # 500 unique images through a 100-entry cache
    after = [rng.choice(hot) for _ in range(500)]
    rates = {}
    for k in (1, 2):
        cache = LRUKCache(max_entries=100, max_bytes=1 << 30, k=k)
        hit_rate(cache, warm)
        hit_rate(cache, scan)
        rates[k] = hit_rate(cache, after)
    assert rates[2] == 1.0, "every hot image survived the scan"
    assert rates[1] < 0.95, "plain LRU lost its hot set to the scan"


def test_entries_and_bytes_are_bounded() -> None:
    cache = LRUKCache(max_entries=10, max_bytes=1000, k=2)
    for key in range(100):
        cache.put(key, key, 150)
        cache.get(key)
        assert len(cache) <= 10 and cache.bytes <= 1000
    assert len(cache) == 6 and cache.bytes == 900
    assert cache.evictions == 94
    cache.put("huge", "x", 5000)  # larger than the whole cache: not stored, nothing evicted for it
    assert cache.get("huge") is None and len(cache) == 6


def test_the_entry_with_the_oldest_kth_use_goes_first() -> None:
    cache = LRUKCache(max_entries=3, max_bytes=1 << 20, k=2)
    for key in ("a", "b", "c"):  # uses at t0, t1, t2
        cache.put(key, key, 1)
    for key in ("a", "b", "c", "a"):  # second uses at t3..t6: K-th most recent a=t3, b=t1, c=t2
        cache.get(key)
    cache.put("d", "d", 1)  # room for d: b has the oldest K-th use
    assert set(cache.keys()) == {"a", "c", "d"}
    cache.put("e", "e", 1)  # room for e: d, used once, goes before anything used twice
    assert set(cache.keys()) == {"a", "c", "e"}


def test_the_rank_heap_stays_bounded_when_nothing_is_evicted() -> None:
    cache = LRUKCache(max_entries=10, max_bytes=1 << 20, k=2)
    for key in range(5):
        cache.put(key, key, 1)
    for _ in range(10_000):
        cache.get(3)
    assert len(cache._old) <= 4 * 16


def test_invalid_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        LRUKCache(0, 10)


def test_another_model_version_or_caller_is_another_key(tmp_path: Path) -> None:
    from infer_server.front.result_cache import ResultCache
    from infer_server.messages import Code, FileRef, ImageOutcome, ImageRef

    data = b"\xff\xd8 some image bytes"
    path = tmp_path / "batch"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        ref = ImageRef(0, 0, len(data), "x")
        file = BatchFile(FileRef(str(path), 0, 0, len(data), fd), (ref,), staged=False)
        cache = ResultCache(10, 1 << 20)
        cache.models = ("cpu", False, (("detector", "1"),))
        hits, todo = cache.split("b1", file, cache.keys(file, "alice"))
        assert (hits, todo) == ([], [ref])
        v1 = (("detector", "1"),)
        cache.store(ImageOutcome("b1", 0, "x", Code.OK, width=3, height=2, digest=image_digest(data)))
        assert cache.split("b1b", file, cache.keys(file, "alice"))[0] == [], (
            "an answer from other versions (a worker not yet moved, during a model change) is not cached"
        )
        cache.store(ImageOutcome("b1b", 0, "x", Code.OK, width=3, height=2, digest=image_digest(data), models=v1))
        assert [h.cached for h in cache.split("b2", file, cache.keys(file, "alice"))[0]] == [True]
        assert cache.split("b3", file, cache.keys(file, "bob"))[0] == [], "another caller never sees it"
        cache.reset(("cpu", False, (("detector", "2"),)))
        assert cache.split("b4", file, cache.keys(file, "alice"))[0] == [], "another model version never serves it"
        cache.store(ImageOutcome("b4", 0, "x", Code.OK, digest=image_digest(b"other bytes")))
        assert cache.split("b5", file, cache.keys(file, "alice"))[0] == [], (
            "an answer for bytes the file no longer held when the worker read it is not cached"
        )
    finally:
        os.close(fd)


def test_a_new_set_of_repeated_images_takes_the_place_of_an_old_one() -> None:
    """Evicted keys keep their use times for a while: without that, images used once could never
    reach K uses in a cache full of entries used twice, and a new hot set would never get in."""
    cache = LRUKCache(max_entries=4, max_bytes=1 << 20, k=2)
    for _ in range(2):
        for key in "abcd":
            if cache.get(key) is None:
                cache.put(key, key, 1)
    for _ in range(3):
        for key in "efgh":
            if cache.get(key) is None:
                cache.put(key, key, 1)
    assert set(cache.keys()) == set("efgh")
