"""Fixtures shared by every test folder."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRAINED_MODELS = ROOT / "engines" / "models"
PLACEHOLDER_MODELS = ROOT / "engines" / "work" / "placeholder_models"


@pytest.fixture(scope="session")
def model_repo_dir() -> Path:
    """The trained model repository, else the recipe's random-weights placeholder (same shapes)."""
    for candidate in (TRAINED_MODELS, PLACEHOLDER_MODELS):
        if (candidate / "detector" / "config.yaml").is_file():
            return candidate
    pytest.skip("no model repository: build engines/models (or the placeholder) first")


@pytest.fixture(scope="session")
def trained_models(model_repo_dir: Path) -> Path:
    """Only the trained repository: for tests that check accuracy against scene ground truth."""
    if model_repo_dir != TRAINED_MODELS:
        pytest.skip("needs the trained models in engines/models")
    return model_repo_dir


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its folder (unit / integration / gpu), so ``-m`` selects by kind."""
    for item in items:
        kind = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if kind in ("unit", "integration", "gpu"):
            item.add_marker(kind)
