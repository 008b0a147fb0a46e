"""The lock files satisfy pyproject.toml, and the check that CI runs catches a lock that does not."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("requirements_lock", ROOT / "requirements" / "lock.py")
assert spec and spec.loader
lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lock)


@pytest.mark.parametrize("name", list(lock.SETS))
def test_committed_locks_satisfy_pyproject(name: str) -> None:
    assert lock.check(name) == []


def test_a_pin_outside_its_range_a_missing_pin_and_a_pin_without_hash_are_reported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    good = (ROOT / "requirements" / "server.txt").read_text()
    lines = good.splitlines()
    # numpy pinned below pyproject's floor, grpcio dropped, pyyaml's hashes removed.
    out, skip = [], False
    for line in lines:
        if skip and line.startswith("    "):
            if line.strip().startswith("#"):
                out.append(line)
            continue
        skip = False
        if line.startswith("numpy=="):
            out.append("numpy==1.20.0 \\")
            out.append("    --hash=sha256:" + "0" * 64)
            skip = True
        elif line.startswith("grpcio=="):
            skip = True
        elif line.startswith("pyyaml=="):
            out.append(line.rstrip(" \\"))
            skip = True
        else:
            out.append(line)
    (tmp_path / "server.txt").write_text("\n".join(out) + "\n")
    monkeypatch.setattr(lock, "HERE", tmp_path)
    problems = "\n".join(lock.check("server"))
    assert "numpy==1.20.0 does not satisfy numpy>=1.26" in problems
    assert "grpcio>=1.66 is not locked" in problems
    assert "pyyaml==" in problems and "has no hash" in problems
