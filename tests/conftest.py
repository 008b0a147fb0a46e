"""Fixtures shared by every test folder, and markers applied by folder."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "engines" / "models"


@pytest.fixture(scope="session")
def model_repo_dir() -> Path:
    """The embedded default model repository (trained, INT8) that the server ships with."""
    if not (MODELS / "detector" / "config.yaml").is_file():
        pytest.fail(f"{MODELS} has no detector: the model repository is part of the checkout (make models rebuilds it)")
    return MODELS


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fronts", type=int, default=0,
        help="start every integration test's server with this many gRPC front processes (its --fronts)",
    )  # fmt: skip
    parser.addoption(
        "--local-socket", action="store_true", default=False,
        help="give every integration test's server a --local-socket, and run its clients' sessions (detect) on it",
    )  # fmt: skip
    parser.addoption(
        "--shards", type=int, default=1,
        help="with --local-socket: start every integration test's server with this many shards (its --shards)",
    )  # fmt: skip


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its folder (unit / integration / gpu / models), so ``-m`` selects by kind."""
    for item in items:
        kind = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if kind in ("unit", "integration", "gpu", "models"):
            item.add_marker(kind)
