"""The recipe that rebuilds the default model repository from nothing: ``make models``.

generate scenes (two drawing styles, ``engines.scenes`` and ``engines.scenes_varied``) → train the
ResNet18 DetectNet_v2 detector → prune it by filter L1 norm and fine-tune → train the ``color`` and
``vehicle_type`` classifiers → export FP32 ONNX → INT8 Q/DQ (symmetric, per-channel) with
``quantize.py`` → pick the detector threshold on validation scenes → evaluate on 500 held-out scenes
(``evaluate.py``) → write ``engines/models/<name>/`` with ``model.onnx``, ``config.yaml``,
``metrics.json`` and the model card.

Every step is a pure function of the seeds below and caches its output under ``engines/work/``, so
an interrupted run resumes where it stopped (``--fresh`` starts over). Seed ranges never overlap:
training, validation (threshold choice), calibration and the held-out evaluation set each have
their own. Training, validation and calibration draw half their scenes in each training style; the
usual held-out set is the ``default`` style, as it has been since the first models, so its mAP
compares across releases. ``engines.scenes_alt`` is never trained on (``package.ALT_EVAL_SEEDS``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engines import nets
from engines.data import SceneRef, SceneSet, build_scene_set, refs
from engines.prune import apply_masks, channel_masks, materialise, parameter_count
from engines.scenes import CLASSES, COLORS, VEHICLE_TYPES
from engines.train import DetectorBatches, classifier_accuracy, seed_everything, train_classifier, train_detector

ROOT = Path(__file__).resolve().parent
WORK = ROOT / "work"
MODELS = ROOT / "models"

TRAIN_SCENES = refs("default", range(0, 3000)) + refs("varied", range(100_000, 103_000))
VAL_SCENES = refs("default", range(500_000, 500_150)) + refs("varied", range(600_000, 600_150))
CALIB_SCENES = refs("default", range(700_000, 700_128)) + refs("varied", range(710_000, 710_128))
EVAL_SCENES = refs("default", range(900_000, 900_500))  # held out: never seen by training, pruning or threshold


@dataclass(frozen=True)
class Recipe:
    detector_iters: int = 1000
    finetune_iters: int = 400
    detector_batch: int = 16
    detector_lr: float = 2e-3
    keep_ratio: float = 0.5
    color_iters: int = 600
    vtype_iters: int = 600
    classifier_batch: int = 64
    classifier_lr: float = 2e-3
    seed: int = 1234


def _scene_set(name: str, scenes: list[SceneRef]) -> SceneSet:
    path = WORK / f"{name}.npz"
    if path.exists():
        z = np.load(path, allow_pickle=False)
        splits = np.cumsum(z["counts"])[:-1]
        return SceneSet(z["images"], np.split(z["boxes"], splits), np.split(z["classes"], splits), z["crops"],
                        z["crop_color"], z["crop_vtype"])
    data = build_scene_set(scenes)
    counts = np.array([len(b) for b in data.boxes])
    np.savez(path, images=data.images, boxes=np.concatenate(data.boxes).astype(np.float32),
             classes=np.concatenate(data.classes), counts=counts, crops=data.crops,
             crop_color=data.crop_color, crop_vtype=data.crop_vtype)
    return data


def _cached_model(path: Path, make, train) -> torch.nn.Module:  # noqa: ANN001
    model = make()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval()
    t0 = time.time()
    train(model)
    torch.save(model.state_dict(), path)
    (path.with_suffix(".json")).write_text(json.dumps({"train_seconds": round(time.time() - t0, 1)}))
    return model.eval()


def train_all(recipe: Recipe) -> dict[str, torch.nn.Module]:
    """Steps 1–4: data, detector, pruning + fine-tuning, classifiers. Returns the torch models."""
    torch.set_num_threads(2)
    WORK.mkdir(parents=True, exist_ok=True)
    train = _scene_set("train", TRAIN_SCENES)
    val = _scene_set("val", VAL_SCENES)
    seed_everything(recipe.seed)

    batches = DetectorBatches(train, len(CLASSES), recipe.seed)
    full = _cached_model(
        WORK / "detector_full.pt", lambda: nets.DetectNetV2(len(CLASSES)),
        lambda m: train_detector(m, batches, recipe.detector_iters, recipe.detector_lr, recipe.detector_batch,
                                 "detector"))

    masks = channel_masks(full, recipe.keep_ratio)
    small = materialise(full, masks)
    probe = torch.from_numpy(val.images[:2]).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        masked_out, small_out = apply_masks(full, masks)(probe), small(probe)
        err = max(float((a - b).abs().max()) for a, b in zip(masked_out, small_out, strict=True))
    if err > 1e-3:
        raise RuntimeError(f"pruned network disagrees with the masked one (max error {err})")
    widths = small.backbone.widths
    pruned = _cached_model(
        WORK / "detector_pruned.pt", lambda: nets.DetectNetV2(len(CLASSES), widths),
        lambda m: (m.load_state_dict(small.state_dict()),
                   train_detector(m, batches, recipe.finetune_iters, recipe.detector_lr / 2, recipe.detector_batch,
                                  "fine-tune pruned")))
    (WORK / "pruning.json").write_text(json.dumps({
        "keep_ratio": recipe.keep_ratio, "widths": widths.as_dict(), "mask_check_max_error": err,
        "params_unpruned": parameter_count(full), "params_pruned": parameter_count(pruned)}, indent=1))

    color = _cached_model(
        WORK / "color.pt", lambda: nets.Classifier(len(COLORS)),
        lambda m: train_classifier(m, train.crops, train.crop_color, recipe.color_iters, recipe.classifier_lr,
                                   recipe.classifier_batch, recipe.seed, "color"))
    cars = train.crop_vtype >= 0
    vtype = _cached_model(
        WORK / "vehicle_type.pt", lambda: nets.Classifier(len(VEHICLE_TYPES)),
        lambda m: train_classifier(m, train.crops[cars], train.crop_vtype[cars], recipe.vtype_iters,
                                   recipe.classifier_lr, recipe.classifier_batch, recipe.seed + 1, "vehicle_type"))
    vcars = val.crop_vtype >= 0
    print(f"val top-1 (torch FP32): color {classifier_accuracy(color, val.crops, val.crop_color):.3f}, "
          f"vehicle_type {classifier_accuracy(vtype, val.crops[vcars], val.crop_vtype[vcars]):.3f}")
    return {"detector_full": full, "detector": pruned, "color": color, "vehicle_type": vtype}


def main() -> None:
    p = argparse.ArgumentParser(description="Rebuild the default model repository (engines/models).")
    p.add_argument("--fresh", action="store_true", help="ignore cached steps in engines/work/")
    p.add_argument("--train-only", action="store_true", help="stop after training (steps 1-4)")
    p.add_argument("--out", type=Path, default=MODELS)
    args = p.parse_args()
    if args.fresh and WORK.exists():
        for f in WORK.glob("*"):
            if f.is_file():
                f.unlink()
    recipe = Recipe()
    t0 = time.time()
    models = train_all(recipe)
    print(f"training done in {time.time() - t0:.0f} s")
    if args.train_only:
        return
    from engines.package import package_repository

    package_repository(models, recipe_dict=asdict(recipe), out=args.out, work=WORK,
                       calib_scenes=CALIB_SCENES, val_scenes=VAL_SCENES, eval_scenes=EVAL_SCENES,
                       train_scenes=TRAIN_SCENES)
    from engines.profile import write_profile

    print(f"reference profile (drift watch): {write_profile(args.out, VAL_SCENES)}")
    print(f"model repository written to {args.out} in {time.time() - t0:.0f} s total")


if __name__ == "__main__":
    main()
