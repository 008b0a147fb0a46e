"""The model repository: one directory per model, with its ``config.yaml`` and its ``model.onnx``.

Read by the stage workers (which models to load, how to pre/post-process, which classes each
attribute model applies to) and written by the recipe in ``engines/``. Paths, thresholds and
routing live in these files, never in code, so a TAO-style DetectNet_v2 model (TrafficCamNet,
PeopleNet) plugs in by dropping its ONNX and a config beside the defaults.

A repository holds exactly one ``kind: detector`` model and any number of ``kind: classifier``
models. Example ``config.yaml`` of a detector::

    name: detector
    kind: detector
    version: "1"
    input: {name: input, width: 416, height: 416, color: rgb, scale: 0.00392156862745098}
    outputs: {coverage: output_cov, bbox: output_bbox}
    labels: [car, bicycle, person, road_sign]
    decode: {stride: 16, bbox_norm: 35.0, offset: 0.5, confidence_threshold: 0.4,
             nms_iou_threshold: 0.5, min_box_size: 4, max_detections: 100}

and of an attribute classifier::

    name: color
    kind: classifier
    input: {name: input, width: 64, height: 64, color: rgb, scale: 0.00392156862745098}
    outputs: {logits: logits}
    labels: [black, white, red, green, blue, yellow, orange, purple]
    applies_to: [car, bicycle, person, road_sign]

Versions, in Triton's layout: a model directory holds either ``model.onnx`` beside its
``config.yaml`` (one version, ``version`` in the config, "1" by default) or numbered version
directories, ``<name>/<version>/model.onnx``, each of which may carry its own ``config.yaml``
(replacing the model's for that version: another input size, other labels). The model's
``version_policy`` says which versions are available — ``{latest: N}`` (the N highest; 1 by
default) or ``{specific: ["2", "3"]}`` — and the highest available one serves.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """How an image becomes the model's input tensor: ``(pixel * scale - mean) / std``, CHW."""

    name: str = "input"
    width: int = Field(gt=0, le=4096)
    height: int = Field(gt=0, le=4096)
    color: Literal["rgb", "bgr"] = "rgb"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)


class DecodeSpec(_Strict):
    """DetectNet_v2 grid decode and NMS parameters (same meaning as in TAO / DeepStream)."""

    stride: int = 16
    bbox_norm: float = 35.0
    offset: float = 0.5
    confidence_threshold: float | list[float] = 0.4
    nms_iou_threshold: float = 0.5
    min_box_size: float = 4.0
    max_detections: int = 100

    def thresholds(self, num_classes: int) -> list[float]:
        t = self.confidence_threshold
        if isinstance(t, list):
            if len(t) != num_classes:
                raise ValueError(f"confidence_threshold has {len(t)} values for {num_classes} classes")
            return list(t)
        return [t] * num_classes


_VERSION = re.compile(r"[1-9][0-9]*")  # a version directory's name (ASCII digits, no leading zero)


class VersionPolicy(_Strict):
    """Which numbered versions of a model are available: the ``latest`` N, or ``specific`` ones."""

    latest: int | None = Field(default=None, ge=1)
    specific: list[str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> VersionPolicy:
        if (self.latest is None) == (self.specific is None):
            raise ValueError("a version_policy is either {latest: N} or {specific: [versions]}")
        if self.specific is not None and not all(_VERSION.fullmatch(v) for v in self.specific):
            raise ValueError("versions are positive whole numbers without leading zeros")
        return self

    def select(self, versions: list[int]) -> list[int]:
        """The available versions among those on disk, in ascending order."""
        if self.specific is not None:
            wanted = [int(v) for v in self.specific]
            missing = sorted(set(wanted) - set(versions))
            if missing:
                raise ValueError(f"version_policy names versions not in the repository: {missing}")
            return sorted(wanted)
        assert self.latest is not None
        return sorted(versions)[-self.latest :]


class ModelConfig(_Strict):
    name: str
    kind: Literal["detector", "classifier"]
    version: str = "1"
    version_policy: VersionPolicy | None = None
    input: InputSpec
    outputs: dict[str, str]
    labels: list[str]
    decode: DecodeSpec | None = None
    applies_to: list[str] | None = None  # classifier: detector labels it runs on (None = all)
    crop_padding: float = 0.0  # classifier: fraction of box size added on each side of a crop
    max_batch_size: int = 64

    @model_validator(mode="after")
    def _check_kind(self) -> ModelConfig:
        if self.kind == "detector":
            if self.decode is None:
                raise ValueError("a detector needs a 'decode' section")
            missing = {"coverage", "bbox"} - set(self.outputs)
            if missing:
                raise ValueError(f"a detector needs outputs {sorted(missing)}")
        elif "logits" not in self.outputs and "probabilities" not in self.outputs:
            raise ValueError("a classifier needs an output named 'logits' or 'probabilities'")
        return self


class ModelEntry(_Strict):
    config: ModelConfig  # of the version that serves (``config.version``)
    directory: Path  # where that version's model.onnx is
    available: tuple[str, ...] = ()  # every version the policy makes available, ascending

    @property
    def onnx_path(self) -> Path:
        return self.directory / "model.onnx"


class ModelRepository(_Strict):
    root: Path
    detector: ModelEntry
    classifiers: tuple[ModelEntry, ...]

    @classmethod
    def load(
        cls, root: str | Path, pins: Mapping[str, str] | None = None, unloaded: Collection[str] = ()
    ) -> ModelRepository:
        """Read every ``*/config.yaml`` under ``root``; raise ``ValueError`` on anything invalid.

        ``pins``: model name → the version to serve instead of the policy's choice (any version on
        disk: an operator's explicit load or rollback); ``unloaded``: classifiers left out."""
        root, pins = Path(root), dict(pins or {})
        if not root.is_dir():
            raise ValueError(f"model repository {root} is not a directory")
        entries = [_entry(p, pins) for p in sorted(root.glob("*/config.yaml"))]
        missing = sorted(pins)  # an unloaded model that is gone from disk is simply not loaded
        if missing:
            raise ValueError(f"{root}: no model named {', '.join(missing)}")
        detectors = [e for e in entries if e.config.kind == "detector"]
        if len(detectors) != 1:
            raise ValueError(f"{root}: expected exactly one detector, found {len(detectors)}")
        detector = detectors[0]
        if detector.config.name in unloaded:
            raise ValueError(f"{detector.config.name} is the detector: every image goes through it")
        classifiers = tuple(e for e in entries if e.config.kind == "classifier" and e.config.name not in unloaded)
        labels = set(detector.config.labels)
        for c in classifiers:
            unknown = set(c.config.applies_to or []) - labels
            if unknown:
                raise ValueError(f"{c.config.name}: applies_to names unknown classes {sorted(unknown)}")
        return cls(root=root, detector=detector, classifiers=classifiers)

    @staticmethod
    def catalog(root: str | Path) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
        """Every model under ``root`` as (name, kind, versions on disk), for the control API; a
        model whose config does not parse is listed with kind ``invalid``."""
        listed = []
        for cfg_path in sorted(Path(root).glob("*/config.yaml")):
            kind: str
            try:
                kind, versions = _config(cfg_path).kind, tuple(map(str, _on_disk(cfg_path.parent)))
            except (OSError, ValueError, yaml.YAMLError):
                kind, versions = "invalid", ()
            listed.append((cfg_path.parent.name, kind, versions))
        return tuple(listed)

    def classifiers_for(self, label: str) -> list[ModelEntry]:
        """Attribute models routed to detections of class ``label``."""
        return [c for c in self.classifiers if c.config.applies_to is None or label in c.config.applies_to]


def _config(path: Path) -> ModelConfig:
    with path.open() as f:
        raw = yaml.safe_load(f)
    try:
        return ModelConfig.model_validate(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _numbered(directory: Path) -> list[int]:
    """The numbered version directories holding a model.onnx, ascending."""
    return sorted(
        int(d.name) for d in directory.iterdir() if _VERSION.fullmatch(d.name) and (d / "model.onnx").is_file()
    )


def _on_disk(directory: Path) -> list[int]:
    """The versions on disk: the numbered ones, or (flat layout) the config's."""
    versions = _numbered(directory)
    if not versions and (directory / "model.onnx").is_file():
        version = _config(directory / "config.yaml").version
        return [int(version)] if _VERSION.fullmatch(version) else []
    return versions


def _entry(cfg_path: Path, pins: dict[str, str]) -> ModelEntry:
    """One model: its flat layout (``model.onnx`` beside the config), or the highest version its
    policy makes available among the numbered version directories, or the one ``pins`` names
    (taken out of ``pins``)."""
    config, directory = _config(cfg_path), cfg_path.parent
    if config.name != directory.name:  # the name callers, pins and results use is the directory's
        raise ValueError(f"{cfg_path}: name {config.name!r} is not its directory's ({directory.name!r})")
    pin = pins.pop(config.name, None)
    versions = _numbered(directory)
    if (directory / "model.onnx").is_file():
        if config.version_policy is not None or versions:
            raise ValueError(f"{directory}: model.onnx beside numbered version directories (or a version_policy): "
                             "keep one layout")  # fmt: skip
        if pin is not None and pin != config.version:
            raise ValueError(f"{config.name} has no version {pin} in the repository (only {config.version})")
        return ModelEntry(config=config, directory=directory, available=(config.version,))
    if not versions:
        raise ValueError(f"{directory}: missing model.onnx (or numbered version directories holding one)")
    available = (config.version_policy or VersionPolicy(latest=1)).select(versions)
    if pin is not None:
        if not _VERSION.fullmatch(pin) or int(pin) not in versions:
            raise ValueError(f"{config.name} has no version {pin} in the repository (it has {versions})")
        available = sorted({*available, int(pin)})
    serving = directory / (pin or str(available[-1]))
    own = serving / "config.yaml"
    chosen = _config(own) if own.is_file() else config
    if (chosen.name, chosen.kind) != (config.name, config.kind):
        raise ValueError(f"{own}: a version's config must keep the model's name and kind")
    chosen = chosen.model_copy(update={"version": serving.name})
    return ModelEntry(config=chosen, directory=serving, available=tuple(map(str, available)))
