"""Who may change models, and what makes the repository poll move."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from infer_server.front.control import ModelControl, repository_fingerprint
from infer_server.front.errors import PermissionDeniedError
from infer_server.front.identity import Identity
from infer_server.settings import ServerSettings


def control(**settings: object) -> ModelControl:
    return ModelControl(SimpleNamespace(settings=ServerSettings(**settings)))  # type: ignore[arg-type]


def caller(name: str) -> Identity:
    return Identity(name, frozenset())


def test_anonymous_callers_of_a_server_without_credentials_may_change_models() -> None:
    control().check_caller(caller("anonymous"))


def test_off_loopback_nobody_may_unless_named() -> None:
    """A plaintext server on the network (--insecure) must not let every peer swap its models."""
    with pytest.raises(PermissionDeniedError):
        control(host="0.0.0.0", insecure=True).check_caller(caller("anonymous"))
    control(host="0.0.0.0", insecure=True, control_callers="anonymous").check_caller(caller("anonymous"))


def test_with_identities_only_the_named_callers_may() -> None:
    named = control(control_callers="alice, carol")
    named.check_caller(caller("alice"))
    named.check_caller(caller("carol"))
    for other in ("bob", "anonymous"):
        with pytest.raises(PermissionDeniedError, match="may not change models"):
            named.check_caller(caller(other))


def test_model_control_none_refuses_everyone() -> None:
    with pytest.raises(PermissionDeniedError, match="model control is off"):
        control(model_control="none").check_caller(caller("anonymous"))


def test_the_fingerprint_changes_with_a_new_version_or_a_replaced_file(tmp_path: Path) -> None:
    (tmp_path / "color" / "1").mkdir(parents=True)
    (tmp_path / "color" / "1" / "model.onnx").write_bytes(b"one")
    first = repository_fingerprint(str(tmp_path))
    assert repository_fingerprint(str(tmp_path)) == first
    (tmp_path / "color" / "2").mkdir()
    (tmp_path / "color" / "2" / "model.onnx").write_bytes(b"two")
    second = repository_fingerprint(str(tmp_path))
    assert second != first
    os.utime(tmp_path / "color" / "1" / "model.onnx", ns=(1, 1))  # replaced in place, same size
    assert repository_fingerprint(str(tmp_path)) != second


def test_outputs_go_into_no_ones_files_by_default_when_the_server_is_root() -> None:
    expected = frozenset() if os.geteuid() == 0 else frozenset({os.geteuid()})
    assert ServerSettings().write_owners() == expected
    assert ServerSettings(region_write_owners="1000,1001").write_owners() == {1000, 1001}
    assert ServerSettings(region_write_owners="").write_owners() == frozenset()
