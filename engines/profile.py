"""Last step of the recipe: the reference profile the server's drift watch compares traffic with.

Runs the server's own pipeline (``infer_server.stage.pipeline.VisionPipeline``: DALI decode, the INT8
engines, DetectNet_v2 decode, the attribute models) on the validation scenes, the ones the detector's
threshold was chosen on, and writes the distribution of every statistic of
``infer_server.profile`` to ``<models>/detector/profile.json``. Deterministic: the scenes are
generated from their seeds, the engines run the same arithmetic on every CPU class.

    python -m engines.profile                 # engines/models/detector/profile.json
    python -m engines.profile --models DIR    # another repository
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from engines.data import SceneRef, describe, generate
from infer_server.messages import ImageOutcome, ImageRef
from infer_server.profile import build_profile
from infer_server.settings import ServerSettings
from infer_server.stage.pipeline import VisionPipeline

MODELS = Path(__file__).resolve().parent / "models"


def answers(repo: Path, jpegs: Iterable[bytes], batch: int = 8) -> Iterator[ImageOutcome]:
    """The server pipeline's outcome for each image, in order."""
    options = ServerSettings(models_dir=repo).worker_options()
    pipeline = VisionPipeline.load(repo, options)
    try:
        source = iter(jpegs)
        while chunk := list(itertools.islice(source, batch)):
            images = [(ImageRef(i, 0, len(j)), j) for i, j in enumerate(chunk)]
            yield from sorted(pipeline.process("profile", images), key=lambda o: o.index)
    finally:
        pipeline.close()


def write_profile(repo: Path, scenes: list[SceneRef]) -> Path:
    jpegs = (generate(ref).jpeg for ref in scenes)
    profile = build_profile(answers(repo, jpegs), f"validation scenes {describe(scenes)} (engines/profile.py)")
    out = repo / "detector" / "profile.json"
    out.write_text(json.dumps(profile, indent=1, sort_keys=True) + "\n")
    return out


def main() -> None:
    from engines.build import VAL_SCENES

    p = argparse.ArgumentParser(description="Write the detector's reference profile (drift watch).")
    p.add_argument("--models", type=Path, default=MODELS)
    args = p.parse_args()
    print(f"wrote {write_profile(args.models, VAL_SCENES)}")


if __name__ == "__main__":
    main()
