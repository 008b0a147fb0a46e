"""Fixtures of the image tests (``make image-test``): the same model repository as tests/."""

from __future__ import annotations

from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[2] / "engines" / "models"


@pytest.fixture(scope="session")
def model_repo_dir() -> Path:
    return MODELS
