"""Versioned model repositories (Triton's layout): which version serves, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infer_server.stage.model_repo import ModelRepository
from tests.helpers import versioned_repository


def served(root: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    repo = ModelRepository.load(root)
    return {e.config.name: (e.config.version, e.available) for e in (repo.detector, *repo.classifiers)}


def test_the_flat_layout_is_version_1_and_the_highest_version_serves(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1, 3, 10))
    assert served(root) == {"detector": ("1", ("1",)), "vehicle_type": ("1", ("1",)), "color": ("10", ("10",))}
    assert ModelRepository.load(root).classifiers[0].directory == root / "color" / "10"


def test_a_version_policy_chooses_what_is_available(tmp_path: Path) -> None:
    assert served(versioned_repository(tmp_path / "a", (1, 2, 3), {"latest": 2}))["color"] == ("3", ("2", "3"))
    assert served(versioned_repository(tmp_path / "b", (1, 2, 3), {"specific": ["1", "2"]}))["color"] == (
        "2",
        ("1", "2"),
    )


def test_a_version_may_bring_its_own_config(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1, 2))
    own = yaml.safe_load((root / "color" / "config.yaml").read_text()) | {"crop_padding": 0.25}
    (root / "color" / "2" / "config.yaml").write_text(yaml.safe_dump(own))
    color = next(c for c in ModelRepository.load(root).classifiers if c.config.name == "color")
    assert (color.config.version, color.config.crop_padding) == ("2", 0.25)


@pytest.mark.parametrize(
    ("versions", "policy", "why"),
    [
        ((), None, "missing model.onnx"),
        ((1, 2), {"specific": ["3"]}, r"not in the repository: \[3\]"),
        ((1,), {"latest": 1, "specific": ["1"]}, "either"),
        ((1,), {"specific": []}, "at least 1"),
        ((1,), {"specific": ["01"]}, "without leading zeros"),
    ],
)
def test_what_cannot_serve_is_refused_with_the_reason(
    tmp_path: Path, versions: tuple[int, ...], policy: dict | None, why: str
) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=why):
        ModelRepository.load(versioned_repository(tmp_path, versions, policy))


def test_a_version_config_must_keep_the_models_name(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1,))
    other = yaml.safe_load((root / "color" / "config.yaml").read_text()) | {"name": "colour"}
    (root / "color" / "1" / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ValueError, match="keep the model's name"):
        ModelRepository.load(root)


def test_a_flat_model_beside_version_directories_is_refused(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1, 2))
    (root / "color" / "model.onnx").symlink_to(root / "color" / "1" / "model.onnx")
    with pytest.raises(ValueError, match="keep one layout"):
        ModelRepository.load(root)


def test_only_plain_numbers_are_versions(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1,))
    for odd in ("03", "v2", "\u0663"):  # a leading zero, a prefix, an Arabic-Indic three
        (root / "color" / odd).mkdir()
        (root / "color" / odd / "model.onnx").symlink_to(root / "color" / "1" / "model.onnx")
    assert served(root)["color"] == ("1", ("1",))


def test_an_operators_pin_serves_any_version_on_disk(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1, 2, 3), {"latest": 1})
    repo = ModelRepository.load(root, {"color": "1"})
    assert (repo.classifiers[0].config.version, repo.classifiers[0].directory) == ("1", root / "color" / "1")
    assert ModelRepository.load(root, {"detector": "1"}).detector.config.version == "1", "flat: its one version"
    for pins, why in [
        ({"color": "7"}, "no version 7"),
        ({"color": "01"}, "no version 01"),
        ({"detector": "2"}, "no version 2"),
        ({"nonesuch": "1"}, "no model named nonesuch"),
    ]:
        with pytest.raises(ValueError, match=why):
            ModelRepository.load(root, pins)


def test_unloaded_attribute_models_are_left_out_but_never_the_detector(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1,))
    assert [c.config.name for c in ModelRepository.load(root, unloaded=("color",)).classifiers] == ["vehicle_type"]
    with pytest.raises(ValueError, match="the detector"):
        ModelRepository.load(root, unloaded=("detector",))
    # An unloaded model whose directory is gone since: nothing to leave out (a restart must not fail).
    assert len(ModelRepository.load(root, unloaded=("ghost",)).classifiers) == 2


def test_the_catalog_lists_every_model_and_its_versions_on_disk(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1, 4), {"specific": ["1"]})
    (root / "broken").mkdir()
    (root / "broken" / "config.yaml").write_text("name: [unclosed")
    assert ModelRepository.catalog(root) == (
        ("broken", "invalid", ()),
        ("color", "classifier", ("1", "4")),
        ("detector", "detector", ("1",)),
        ("vehicle_type", "classifier", ("1",)),
    )


def test_a_models_name_is_its_directorys(tmp_path: Path) -> None:
    root = versioned_repository(tmp_path, (1,))
    (root / "vehicle_type").rename(root / "vehicle")
    with pytest.raises(ValueError, match="not its directory"):
        ModelRepository.load(root)
