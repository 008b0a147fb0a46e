"""ServerSettings: INFER_* environment, derived directories, and limits that contradict each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from infer_server.settings import ServerSettings


def test_defaults_and_derived_staging_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INFER_SHM_DIR", raising=False)
    s = ServerSettings()
    assert s.shm_dir == Path("/dev/shm/infer") and s.staging == Path("/dev/shm/infer/.server")
    assert (s.max_batch_images, s.max_batch_bytes, s.max_inflight_images) == (256, 256 * 1024 * 1024, 1024)
    assert s.models_dir == Path.cwd() / "engines" / "models"


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
    for staging in ("/dev/shm/infer", "/dev/shm"):  # its files are deleted: never the clients' directory
        with pytest.raises(ValidationError, match="staging_dir must not be the shared directory"):
            ServerSettings(shm_dir="/dev/shm/infer", staging_dir=staging)


def test_every_setting_is_a_flag_of_serve() -> None:
    import typer.main

    from infer_server.cli import app

    serve = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]
    flags = {opt for param in serve.params for opt in (*param.opts, *param.secondary_opts)}
    for name, field in ServerSettings.model_fields.items():
        internal = isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("internal")
        assert ("--" + name.replace("_", "-") in flags) != bool(internal), name
    assert {"--models", "--batch-deadline", "--result-ttl", "--null-model", "--no-null-model"} <= flags


def test_settings_from_flags_beat_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import infer_server.cli as cli

    seen: list[ServerSettings] = []
    monkeypatch.setattr(cli, "_serve", lambda settings: seen.append(settings) or _done())
    monkeypatch.setattr(cli, "prefer_epoll_io", lambda: False)  # leave this process's environment alone
    monkeypatch.setenv("INFER_WORKERS", "5")
    monkeypatch.setenv("INFER_BATCH_SIZE", "4")
    result = CliRunner().invoke(cli.app, ["serve", "--workers", "3", "--log-level", "warning", "--batch-deadline", "9"])
    assert result.exit_code == 0, result.output
    (settings,) = seen
    got = (settings.workers, settings.batch_size, settings.log_level, settings.batch_deadline_s)
    assert got == (3, 4, "WARNING", 9)
    bad = CliRunner().invoke(cli.app, ["serve", "--workers", "0"])
    assert bad.exit_code == 2 and "invalid settings" in bad.output


async def _done() -> int:
    return 0


def test_an_address_off_loopback_needs_tls_or_an_explicit_insecure(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="reachable from the network"):
        ServerSettings(host="0.0.0.0")
    assert ServerSettings(host="0.0.0.0", insecure=True).insecure
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    assert ServerSettings(host="::", tls_cert=cert, tls_key=key).tls_cert == cert
    for loopback in ("127.0.0.1", "localhost", "::1", "[::1]", "127.1.2.3"):
        assert ServerSettings(host=loopback).host == loopback
    with pytest.raises(ValidationError, match="both"):
        ServerSettings(tls_cert=cert)
    with pytest.raises(ValidationError, match="needs tls_cert"):
        ServerSettings(tls_client_ca=cert)


@pytest.mark.parametrize("socket", ["unix_socket", "local_socket"])
def test_callers_on_a_unix_socket_need_tokens_where_certificates_name_the_callers(tmp_path: Path, socket: str) -> None:
    mtls: dict[str, Any] = {"tls_cert": tmp_path / "c.pem", "tls_key": tmp_path / "k.pem"}
    mtls["tls_client_ca"] = tmp_path / "ca"
    with pytest.raises(ValidationError, match="no client certificate: give them tokens"):
        ServerSettings(**mtls, **{socket: tmp_path / "s.sock"})
    assert ServerSettings(**mtls, **{socket: tmp_path / "s.sock"}, tokens_file=tmp_path / "t").tokens_file
    with pytest.raises(ValidationError, match="two paths"):
        ServerSettings(unix_socket=tmp_path / "s.sock", local_socket=tmp_path / "s.sock")


def test_the_worker_memory_bound_is_off_or_at_least_256_mib() -> None:
    assert ServerSettings(worker_memory_mib=0).worker_options().memory_mib is None
    assert ServerSettings().worker_options().memory_mib == 2048
    with pytest.raises(ValidationError, match="at least 256"):
        ServerSettings(worker_memory_mib=100)


def test_file_owners_and_stream_bounds() -> None:
    assert ServerSettings(file_owners="1000, 1001").owner_uids() == {1000, 1001}
    with pytest.raises(ValidationError):
        ServerSettings(file_owners="alice")
    s = ServerSettings(max_concurrent_rpcs=100)
    assert s.max_streams == 75, "a quarter of the RPCs stays free for pushes and health checks"
