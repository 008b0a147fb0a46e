"""What the result cache buys and costs: repeat streams and a scan, with the models, in one run.

Three servers with the embedded models run side by side: no cache, an LRU-K cache (K = 2) and a
plain LRU cache (K = 1), the caches small enough that a scan overflows them. Every point is run on
each server in turn (the order flips point to point), with one client pushing batches of 8:

* **repeat streams** — 0%, 30% and 70% of the images are repeats of images pushed earlier in the
  stream: images/s and hit rate per server, and every cached answer compared with the uncached
  server's answer for the same image (they must be identical);
* **scan** — warm the caches with a hot set (each image seen several times), push a scan of unique
  images three times the cache's size, then the hot set again: the hit rate of that last phase is
  what LRU-K keeps and LRU loses.

    .venv/bin/python -m benchmarks.cache --images 96 --json bench-out/cache.json --plot bench-out
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks import servers
from engines.scenes import generate_scene
from infer_client import ImageResult, InferClient

MODELS = servers.REPO_ROOT / "engines" / "models"
BATCH = 8
CACHE_ENTRIES = 48


def _server(label: str, cache: int, k: int) -> contextlib.AbstractContextManager[servers.ServerProcess]:
    args = ["infer_server", "serve", "--models", str(MODELS), "--host", "127.0.0.1", "--port", "0",
            "--workers", "2", "--batch-size", str(BATCH), "--log-level", "WARNING"]  # fmt: skip
    if cache:
        args += ["--result-cache-entries", str(cache), "--result-cache-k", str(k)]
    return servers.launched("grpc", args, shm=True, label=label)


def _stream(seed: int, n: int, repeats: float, pool: list[bytes]) -> list[bytes]:
    """``n`` images, a ``repeats`` share of them images already pushed in this stream."""
    rng = random.Random(seed)
    out: list[bytes] = []
    fresh = iter(pool)
    for _ in range(n):
        out.append(rng.choice(out) if out and rng.random() < repeats else next(fresh))
    return out


def _run(server: servers.ServerProcess, images: list[bytes]) -> tuple[float, list[ImageResult]]:
    """Images/s over the stream (batches of ``BATCH``, one client) and every result in order."""
    results: list[ImageResult] = []
    with InferClient(server.address, shm_dir=server.shm_dir, transport="tmpfs") as client:
        started = time.perf_counter()
        for i in range(0, len(images), BATCH):
            results += client.detect(images[i : i + BATCH])
        elapsed = time.perf_counter() - started
    return len(images) / elapsed, results


def _answer(result: ImageResult) -> str:
    d = result.to_dict()
    return json.dumps({k: d[k] for k in ("status", "width", "height", "detections")}, sort_keys=True)


def main(
    images: Annotated[int, typer.Option(help="Images per repeat stream.")] = 96,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write cache.png into this directory.")] = None,
) -> None:
    """Run the repeat streams and the scan on three servers; print and save what they measured."""
    hot_size, scan_size = 24, 3 * CACHE_ENTRIES
    count = 3 * images + scan_size + hot_size
    pool = [generate_scene(seed, width=640, height=480).jpeg for seed in range(20000, 20000 + count)]
    doc: dict[str, Any] = {"images": images, "batch": BATCH, "cache_entries": CACHE_ENTRIES, "repeats": [], "scan": {}}
    with (
        _server("nocache", 0, 2) as off,
        _server("lruk", CACHE_ENTRIES, 2) as lruk,
        _server("lru", CACHE_ENTRIES, 1) as lru,
    ):
        sides = {"off": off, "lru-2": lruk, "lru": lru}
        truth: dict[bytes, str] = {}
        for n, share in enumerate((0.0, 0.3, 0.7)):
            stream = _stream(n, images, share, pool[n * images : (n + 1) * images])
            order = list(sides) if n % 2 == 0 else list(reversed(sides))
            point: dict[str, Any] = {"repeats": share}
            for label in order:
                fps, results = _run(sides[label], stream)
                hits = sum(r.cached for r in results)
                for image, result in zip(stream, results, strict=True):
                    if label == "off":
                        truth[image] = _answer(result)
                point[label] = {"fps": fps, "hit_rate": hits / len(stream), "results": results}
            mismatched = sum(
                _answer(r) != truth[image]
                for label in ("lru-2", "lru") for image, r in zip(stream, point[label]["results"], strict=True)
            )  # fmt: skip
            for label in sides:
                del point[label]["results"]
            point["cached_answers_differing_from_uncached"] = mismatched
            doc["repeats"].append(point)
            print(f"repeats {share:.0%}: " + "  ".join(
                f"{label} {point[label]['fps']:.1f} img/s hit {point[label]['hit_rate']:.0%}" for label in sides
            ) + f"  differing answers: {mismatched}")  # fmt: skip
        scan = pool[3 * images : 3 * images + scan_size]
        hot = pool[3 * images + scan_size :]
        for label in ("lru-2", "lru"):
            _run(sides[label], hot * 3)
            _run(sides[label], scan)
            _, after = _run(sides[label], hot)
            doc["scan"][label] = sum(r.cached for r in after) / len(after)
        print(f"scan of {len(scan)} unique images through a {CACHE_ENTRIES}-entry cache, then the hot set of "
              f"{len(hot)}: hit rate LRU-2 {doc['scan']['lru-2']:.0%}, LRU {doc['scan']['lru']:.0%}")  # fmt: skip
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(doc, indent=2))
    if plot is not None:
        _plot(doc, plot)


def _plot(doc: dict[str, Any], folder: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    shares = [p["repeats"] for p in doc["repeats"]]
    for label in ("off", "lru-2", "lru"):
        left.plot([f"{s:.0%}" for s in shares], [p[label]["fps"] for p in doc["repeats"]], marker="o", label=label)
    left.set(title="repeat streams (models, 2 workers)", xlabel="repeated images", ylabel="images/s")
    left.legend()
    right.bar(["LRU-2", "LRU"], [doc["scan"]["lru-2"], doc["scan"]["lru"]])
    right.set(title="hot set after a scan", ylabel="hit rate", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(folder / "cache.png", dpi=100)
    print(f"plot: {folder / 'cache.png'}")


if __name__ == "__main__":
    typer.run(main)
