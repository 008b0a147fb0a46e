"""The model repositories of the benchmark's configurations, assembled in a temporary directory.

Called by ``benchmarks.fps`` in the benchmark's process; the server and the bounds then load the
returned directory like any repository (``infer_server.stage.model_repo``). Configurations:

* ``detector``: the source repository's detector alone (its directory linked into a tempdir).
* ``full``: the detector and the default attribute models (every model directory linked).
* ``seed4``: the detector + 2 ResNet34 + 2 ResNet18 classifiers at 224×224 on every detection —
  the configuration behind the "800 fps on a T4" claim this product is compared with. The
  classifiers have random weights (speed only; the report says so), are built without torch by
  ``benchmarks.resnet_onnx`` and quantized to symmetric INT8 Q/DQ exactly as the recipe quantizes
  the default models (``engines.quantize.quantize_int8``, 256 calibration crops of scene objects),
  or left FP32 if asked. They are cached (building takes a minute) under ``cache_dir``.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import yaml

from benchmarks.resnet_onnx import write_resnet
from engines.scenes import generate_scene

CONFIGS = ("detector", "full", "seed4")
# (name, depth, classes): the secondary classifiers of the seed4 configuration.
SEED4_CLASSIFIERS = (
    ("sgie_resnet34_a", 34, 12),
    ("sgie_resnet34_b", 34, 20),
    ("sgie_resnet18_a", 18, 8),
    ("sgie_resnet18_b", 18, 6),
)
SEED4_SIZE = 224
SEED4_VERSION = "bench-random-1"  # bump when the ONNX builder changes: it keys the cache
CALIBRATION_SEEDS = range(800_000, 800_200)  # apart from every seed range the recipe uses
CALIBRATION_CROPS = 256


@dataclass(frozen=True)
class Repository:
    config: str
    path: Path
    models: tuple[str, ...]
    note: str  # what a reader must know about these models


def assemble(config: str, source: Path, dest: Path, *, cache_dir: Path, int8: bool = True) -> Repository:
    """Lay out ``config``'s repository under ``dest`` (a fresh directory) from ``source``."""
    if config not in CONFIGS:
        raise ValueError(f"unknown configuration {config!r} (expected one of {CONFIGS})")
    dirs = {p.name: p for p in sorted(source.iterdir()) if (p / "config.yaml").is_file()}
    detector = next(
        name for name, p in dirs.items() if yaml.safe_load((p / "config.yaml").read_text())["kind"] == "detector"
    )
    picked = {"detector": [detector], "full": list(dirs), "seed4": [detector]}[config]
    for name in picked:
        (dest / name).symlink_to(dirs[name].resolve(), target_is_directory=True)
    note = ""
    if config == "seed4":
        labels = yaml.safe_load((dirs[detector] / "config.yaml").read_text())["labels"]
        built = seed4_classifiers(dest, cache_dir, labels, int8=int8)
        picked += [p.name for p in built]
        note = "seed4 classifiers have untrained random weights (speed only), " + (
            "INT8 Q/DQ like the default models" if int8 else "run in FP32"
        )
    return Repository(config, dest, tuple(picked), note)


def seed4_classifiers(dest: Path, cache_dir: Path, labels: list[str], *, int8: bool) -> list[Path]:
    """The four classifier directories under ``dest``: ONNX built once into ``cache_dir`` (linked),
    config written fresh."""
    onnx_files = _seed4_onnx(cache_dir, int8)
    dirs = []
    for (name, depth, classes), onnx_file in zip(SEED4_CLASSIFIERS, onnx_files, strict=True):
        out = dest / name
        out.mkdir()
        (out / "model.onnx").symlink_to(onnx_file)
        _write_config(out, name, depth, classes, labels, int8)
        dirs.append(out)
    return dirs


def _seed4_onnx(cache_dir: Path, int8: bool) -> list[Path]:
    """The classifiers' ONNX files, built (and INT8-quantized) only if the cache lacks them."""
    root = cache_dir / f"seed4-{SEED4_VERSION}-{'int8' if int8 else 'fp32'}"
    wanted = [root / f"{name}.onnx" for name, _, _ in SEED4_CLASSIFIERS]
    if all(p.is_file() for p in wanted):
        return wanted
    root.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".seed4-", dir=root.parent))
    try:
        calibration = calibration_crops() if int8 else None
        for i, (name, depth, classes) in enumerate(SEED4_CLASSIFIERS):
            fp32 = write_resnet(work / f"{name}.fp32.onnx", depth, classes, SEED4_SIZE, seed=i)
            if calibration is not None:
                from engines.quantize import quantize_int8  # onnxruntime.quantization: only when building

                quantize_int8(fp32, work / f"{name}.onnx", calibration)
                fp32.unlink()
            else:
                fp32.rename(work / f"{name}.onnx")
        shutil.rmtree(root, ignore_errors=True)
        work.rename(root)  # readers see a whole set or none
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return wanted


def _write_config(out: Path, name: str, depth: int, classes: int, labels: list[str], int8: bool) -> None:
    config = {
        "name": name,
        "kind": "classifier",
        "version": SEED4_VERSION,
        "input": {"name": "input", "width": SEED4_SIZE, "height": SEED4_SIZE, "color": "rgb", "scale": 1 / 255},
        "outputs": {"logits": "logits"},
        "labels": [f"class_{k:02d}" for k in range(classes)],
        "applies_to": list(labels),  # every detection, of every class
        "crop_padding": 0.0,
        # 16 crops per engine call, as DeepStream's secondary-classifier samples use: ONNX Runtime's
        # arena holds the activations of the largest batch for every model in every worker, and at
        # 64 crops of 224×224 four ResNets took 7 GB across two workers.
        "max_batch_size": 16,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    precision = "symmetric INT8 Q/DQ (engines.quantize)" if int8 else "FP32"
    (out / "README.md").write_text(
        f"# {name}\n\nResNet{depth}, {classes} classes, {SEED4_SIZE}×{SEED4_SIZE} input, {precision}.\n"
        "**Random, untrained weights**: built by `benchmarks/repos.py` to measure the speed of the\n"
        "seed4 configuration only. Its labels mean nothing.\n"
    )


def calibration_crops(count: int = CALIBRATION_CROPS) -> np.ndarray:
    """``count`` uint8 NHWC RGB crops of scene objects at the classifiers' input size."""
    crops: list[np.ndarray] = []
    for seed in CALIBRATION_SEEDS:
        scene = generate_scene(seed)
        bgr = cv2.imdecode(np.frombuffer(scene.jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert bgr is not None, "the generator's own JPEG always decodes"
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        for obj in scene.objects:
            x1, y1, x2, y2 = (int(round(v)) for v in obj.box)
            x1, y1 = max(x1, 0), max(y1, 0)
            x2, y2 = min(max(x2, x1 + 1), scene.width), min(max(y2, y1 + 1), scene.height)
            crops.append(cv2.resize(rgb[y1:y2, x1:x2], (SEED4_SIZE, SEED4_SIZE), interpolation=cv2.INTER_AREA))
            if len(crops) == count:
                return np.stack(crops)
    raise RuntimeError(f"only {len(crops)} calibration crops in {len(CALIBRATION_SEEDS)} scenes")
