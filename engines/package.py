"""Second half of the recipe: trained torch models → the INT8 model repository with model cards.

export FP32 ONNX → quantize to symmetric INT8 Q/DQ → choose the detector's confidence threshold on
validation scenes → evaluate FP32 and INT8 on the held-out scenes → measure CPU throughput (the
unpruned and pruned INT8 detectors in the same run) → write ``<out>/<name>/{model.onnx,
config.yaml, metrics.json, README.md}``. FP32 files stay in ``engines/work/`` (reproducible, not
committed).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from engines import nets
from engines.configs import CROP_INPUT, DETECTOR_INPUT, classifier_config, detector_config, write_config
from engines.data import build_scene_set
from engines.evaluate import (
    best_threshold,
    decode_scenes,
    evaluate_classifier,
    evaluate_detector,
    throughput,
)
from engines.quantize import nonzero_zero_points, quantize_int8
from infer_server.model_repo import ModelConfig

OUTPUTS = {"detector": ["output_cov", "output_bbox"], "classifier": ["logits"]}


def _export_and_quantize(models: dict[str, torch.nn.Module], work: Path, calib_seeds: range) -> dict[str, dict]:
    fp32_dir, int8_dir = work / "fp32", work / "int8"
    fp32_dir.mkdir(parents=True, exist_ok=True)
    int8_dir.mkdir(parents=True, exist_ok=True)
    calib = build_scene_set(list(calib_seeds))
    paths = {}
    for name, model in models.items():
        is_det = name.startswith("detector")
        fp32, int8 = fp32_dir / f"{name}.onnx", int8_dir / f"{name}.onnx"
        nets.export_onnx(model, str(fp32), DETECTOR_INPUT[::-1] if is_det else CROP_INPUT[::-1],
                         OUTPUTS["detector" if is_det else "classifier"])
        if is_det:
            data = calib.images
        elif name == "vehicle_type":
            data = calib.crops[calib.crop_vtype >= 0]
            data = np.concatenate([data] * int(np.ceil(256 / max(1, len(data)))))[: max(256, len(data))]
        else:
            data = calib.crops
        quantize_int8(fp32, int8, data)
        paths[name] = {"fp32": fp32, "int8": int8}
    return paths


def _machine() -> str:
    cpu = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores, {platform.machine()}"


def _card(name: str, config: dict, metrics: dict) -> str:
    m = metrics
    lines = [f"# `{name}` — model card", ""]
    if name == "detector":
        acc = m["accuracy"]
        p = m["pruning"]
        lines += [
            "DetectNet_v2 detector with a ResNet18 backbone (TAO TrafficCamNet layout: stride 16, coverage "
            "`output_cov` [4,26,26] after sigmoid, boxes `output_bbox` [16,26,26], bbox_norm 35, offset 0.5), "
            "input 3×416×416 RGB × 1/255. Classes: " + ", ".join(config["labels"]) + ".",
            "",
            "## How it was made",
            f"- Trained from scratch on {m['data']['train_scenes']} generated street scenes "
            f"(`engines/scenes.py`, seeds {m['data']['train_seeds']}) for {m['recipe']['detector_iters']} "
            f"iterations of {m['recipe']['detector_batch']} grid-aligned 256×256 crops (AdamW, one-cycle LR).",
            f"- Pruned by filter L1 norm (residual streams pruned as groups), keeping {p['keep_ratio']:.0%} of the "
            f"channels: {p['params_unpruned']:,} → {p['params_pruned']:,} parameters; fine-tuned "
            f"{m['recipe']['finetune_iters']} iterations.",
            f"- INT8: ONNX Runtime `quantize_static`, Q/DQ, per-channel weights, symmetric activations and "
            f"weights (all zero points 0), MinMax calibration on {m['data']['calibration_images']} images.",
            f"- Confidence threshold {config['decode']['confidence_threshold']} chosen for best F1 on "
            f"{m['data']['validation_scenes']} validation scenes.",
            "",
            f"## Accuracy ({m['data']['eval_scenes']} held-out scenes, seeds {m['data']['eval_seeds']}, "
            f"{acc['int8']['ground_truth_objects']} objects)",
            "AP@0.5 (VOC all-point); objects under 12 px on a side at 416×416 are don't-care.",
            "",
            "| model | " + " | ".join(config["labels"]) + " | mAP@0.5 | precision | recall |",
            "|---|" + "---|" * (len(config["labels"]) + 3),
        ]
        for key, title in (("fp32", "pruned FP32"), ("int8", "pruned INT8 (shipped)"),
                           ("unpruned_int8", "unpruned INT8")):
            a = acc[key]
            lines.append(f"| {title} | " + " | ".join(f"{a['ap50'][c]:.3f}" for c in config["labels"])
                         + f" | **{a['map50']:.3f}** | {a['precision']:.3f} | {a['recall']:.3f} |")
    else:
        acc = m["accuracy"]
        lines += [
            f"ResNet18 classifier on {config['input']['width']}×{config['input']['height']} crops, labels: "
            + ", ".join(config["labels"]) + f". Runs on detections of: {', '.join(config['applies_to'])}.",
            "",
            "## How it was made",
            f"- Trained from scratch on {m['data']['train_crops']} ground-truth crops (boxes jittered ±8% like a "
            f"detector's) from the training scenes, {m['recipe']['iters']} iterations of {m['recipe']['batch']}.",
            "- INT8 as for the detector: symmetric Q/DQ, per-channel weights, all zero points 0.",
            "",
            f"## Accuracy (ground-truth crops of {m['data']['eval_scenes']} held-out scenes)",
            "| model | top-1 | crops |",
            "|---|---|---|",
            f"| FP32 | {acc['fp32']['top1']:.3f} | {acc['fp32']['crops']} |",
            f"| INT8 (shipped) | **{acc['int8']['top1']:.3f}** | {acc['int8']['crops']} |",
        ]
    lines += ["", "## Speed (CPU, ONNX Runtime, one thread, images/s)", "| model | batch 1 | batch 8 |",
              "|---|---|---|"]
    for title, t in m["throughput"].items():
        lines.append(f"| {title} | {t['batch1_ips']} | {t['batch8_ips']} |")
    if name == "detector":
        lines.append(f"\nPruned INT8 vs unpruned INT8 at batch 8, same run: **{m['speedup_batch8']:.2f}×**.")
        lines.append("\nOn CPU, ONNX Runtime runs these symmetric INT8 (S8S8) graphs at about FP32 speed: its fast x86 "
                     "kernels want unsigned activations, and the symmetric form is what TensorRT needs. The INT8 "
                     "gain is on the GPU; the CPU gain comes from pruning.")
    lines += ["", f"Measured {m['measured']['date']} on {m['measured']['machine']}.", "",
              "## Limitations",
              "- Trained only on synthetic scenes (flat-shaded silhouettes on muted backgrounds); it is a demo "
              "model for running the server offline, not a model for real traffic footage. Real TAO models "
              "(TrafficCamNet, PeopleNet) plug in through `config.yaml`.",
              "- Objects under ~12 px on a side at the 416×416 input scale are not expected to be found.",
              "", "Rebuild: `make models`; re-measure: `python -m engines.evaluate`.", ""]
    return "\n".join(lines)


def package_repository(models: dict[str, torch.nn.Module], *, recipe_dict: dict, out: Path, work: Path,
                       calib_seeds: range, val_seeds: range, eval_seeds: range) -> dict:
    paths = _export_and_quantize(models, work, calib_seeds)
    det_cfg = ModelConfig.model_validate(detector_config())
    val = decode_scenes(val_seeds, det_cfg)
    threshold = best_threshold(evaluate_detector(paths["detector"]["int8"], det_cfg, val)["_tally"])
    configs = {"detector": detector_config(threshold), "color": classifier_config("color"),
               "vehicle_type": classifier_config("vehicle_type")}
    det_cfg = ModelConfig.model_validate(configs["detector"])
    held = decode_scenes(eval_seeds, det_cfg)

    def det_eval(path: Path) -> dict:
        r = evaluate_detector(path, det_cfg, held)
        r.pop("_tally")
        return r

    accuracy = {"detector": {"fp32": det_eval(paths["detector"]["fp32"]), "int8": det_eval(paths["detector"]["int8"]),
                             "unpruned_int8": det_eval(paths["detector_full"]["int8"])}}
    for name in ("color", "vehicle_type"):
        cfg = ModelConfig.model_validate(configs[name])
        accuracy[name] = {k: evaluate_classifier(paths[name][k], cfg, held) for k in ("fp32", "int8")}
    speed = throughput({"unpruned INT8": paths["detector_full"]["int8"], "pruned INT8 (shipped)":
                        paths["detector"]["int8"], "pruned FP32": paths["detector"]["fp32"]},
                       (3, DETECTOR_INPUT[1], DETECTOR_INPUT[0]))
    for name in ("color", "vehicle_type"):
        speed.update({f"{name} INT8": v for v in throughput({name: paths[name]["int8"]},
                                                               (3, CROP_INPUT[1], CROP_INPUT[0])).values()})
    measured = {"date": datetime.date.today().isoformat(), "machine": _machine()}
    pruning = json.loads((work / "pruning.json").read_text())
    train_secs = {p.stem: json.loads(p.read_text()).get("train_seconds") for p in work.glob("*.json")
                  if p.stem in ("detector_full", "detector_pruned", "color", "vehicle_type")}
    data = {"train_scenes": 3000, "train_seeds": "0–2999", "validation_scenes": len(val_seeds),
            "calibration_images": len(calib_seeds), "eval_scenes": len(eval_seeds),
            "eval_seeds": f"{eval_seeds.start}–{eval_seeds.stop - 1}"}
    if out.exists():
        shutil.rmtree(out)
    summary = {}
    for name, cfg in configs.items():
        d = out / name
        write_config(d, cfg)
        shutil.copyfile(paths[name]["int8"], d / "model.onnx")
        if nonzero_zero_points(d / "model.onnx"):
            raise RuntimeError(f"{name}: non-zero zero points")
        if name == "detector":
            sp = speed["pruned INT8 (shipped)"]["batch8_ips"] / speed["unpruned INT8"]["batch8_ips"]
            metrics = {"accuracy": accuracy[name], "pruning": pruning, "speedup_batch8": round(sp, 3),
                       "throughput": {k: v for k, v in speed.items() if "INT8" in k and not k.startswith(("color",
                                      "vehicle"))} | {"pruned FP32": speed["pruned FP32"]},
                       "recipe": recipe_dict, "train_seconds": train_secs}
        else:
            sub = {"color": "color", "vehicle_type": "vtype"}[name]
            crops = int((np.load(work / "train.npz")["crop_vtype"] >= 0).sum()) if name == "vehicle_type" else \
                int(len(np.load(work / "train.npz")["crop_color"]))
            metrics = {"accuracy": accuracy[name], "throughput": {f"{name} INT8": speed[f"{name} INT8"]},
                       "recipe": {"iters": recipe_dict[f"{sub}_iters"], "batch": recipe_dict["classifier_batch"]},
                       "train_seconds": train_secs.get(name)}
            data = data | {"train_crops": crops}
        metrics |= {"data": data, "measured": measured}
        (d / "metrics.json").write_text(json.dumps(metrics, indent=1))
        (d / "README.md").write_text(_card(name, cfg, metrics))
        summary[name] = metrics
    return summary
