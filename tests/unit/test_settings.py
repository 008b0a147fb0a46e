"""ServerSettings: INFER_* environment, derived directories, and limits that contradict each other."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from infer_server.settings import ServerSettings


def test_defaults_and_derived_staging_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFER_SHM_DIR", raising=False)
    s = ServerSettings()
    assert s.shm_dir == Path("/dev/shm/infer") and s.staging == Path("/dev/shm/infer/.server")
    assert (s.max_batch_images, s.max_batch_bytes, s.max_inflight_images) == (256, 256 * 1024 * 1024, 1024)
    assert s.models_dir.name == "models" and s.models_dir.parent.name == "engines"


def test_environment_and_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFER_PORT", "9000")
    monkeypatch.setenv("INFER_SHM_DIR", "/dev/shm/elsewhere")
    s = ServerSettings(workers=3)
    assert (s.port, s.workers, s.staging) == (9000, 3, Path("/dev/shm/elsewhere/.server"))


def test_contradictory_limits_are_refused() -> None:
    with pytest.raises(ValidationError):
        ServerSettings(max_inflight_images=4)  # a 256-image batch could never be admitted
    with pytest.raises(ValidationError):
        ServerSettings(device="tpu")
    with pytest.raises(ValidationError):
        ServerSettings(unknown_knob=1)
