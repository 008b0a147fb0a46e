"""TLS and mutual TLS against a real server: the client certificate names the caller.

Certificates are made for the test with the ``openssl`` command (a throwaway CA, a server
certificate for 127.0.0.1, a client certificate whose common name is the caller's identity).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from engines.scenes import generate_scene
from infer_client import Credentials, InferError
from tests.integration.conftest import RunningServer, running_server

JPEG = generate_scene(78, width=160, height=120).jpeg


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, subject: str, extensions: str) -> None:
    """A key and a certificate signed by the folder's CA."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key",
             "-out", f"{name}.csr", "-subj", subject, cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def pki() -> Iterator[Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    folder = Path(tempfile.mkdtemp(prefix="infer-pki-"))
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
             "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=infer test CA", cwd=folder)  # fmt: skip
    _issue(folder, "server", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _issue(folder, "client", "/CN=camera-7", "extendedKeyUsage=clientAuth\n")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def credentials(pki: Path, certificate: bool = True) -> Credentials:
    if not certificate:
        return Credentials(root_certificates=(pki / "ca.pem").read_bytes())
    return Credentials(
        root_certificates=(pki / "ca.pem").read_bytes(),
        certificate_chain=(pki / "client.pem").read_bytes(),
        private_key=(pki / "client.key").read_bytes(),
    )


@pytest.fixture(scope="module")
def server(model_repo_dir: Path, pki: Path) -> Iterator[RunningServer]:
    tls = ("--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"))
    args = ("--null-model", *tls, "--tls-client-ca", str(pki / "ca.pem"))
    with running_server(model_repo_dir, *args, workers=1, credentials=credentials(pki)) as srv:
        yield srv


def test_a_client_certificate_names_the_caller(server: RunningServer) -> None:
    with server.client(transport="inline") as client:
        assert [r.ok for r in client.detect([JPEG])] == [True]
    pushes = [json.loads(line.split(": ", 1)[1]) for line in server.log().splitlines() if '"event":"push"' in line]
    assert pushes and pushes[-1]["identity"] == "camera-7"


@pytest.mark.parametrize("who", ["no client certificate", "plaintext"])
def test_without_a_client_certificate_nothing_gets_through(server: RunningServer, pki: Path, who: str) -> None:
    given = credentials(pki, certificate=False) if who == "no client certificate" else Credentials()
    with server.client(credentials=given, transport="inline", timeout=10) as client, pytest.raises(InferError) as info:
        client.detect([JPEG])
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_plaintext_off_loopback_is_refused_at_start(tmp_path: Path) -> None:
    """Finding: with ``--host 0.0.0.0`` everything was reachable from the network, unencrypted."""
    cmd = [sys.executable, "-m", "infer_server", "serve", "--host", "0.0.0.0", "--shm-dir", str(tmp_path / "shm")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "reachable from the network" in done.stderr and "--insecure" in done.stderr
    assert not (tmp_path / "shm").exists(), "refused before anything was created"
