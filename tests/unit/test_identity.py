"""Identities: the tokens file's rules, and how a call's credentials map to a caller."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from infer_server.front.errors import Unauthenticated
from infer_server.front.identity import ANONYMOUS, Authenticator, Identity, load_tokens

OWNERS = frozenset({os.geteuid()})


class Call:
    """A servicer context as identification reads it."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), common_name: bytes | None = None) -> None:
        self._metadata = metadata
        self._auth = {"x509_common_name": [common_name]} if common_name else {}

    def invocation_metadata(self) -> Any:
        return self._metadata

    def auth_context(self) -> dict[str, Any]:
        return self._auth


def tokens_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_tokens_name_callers_and_the_file_owners_they_may_push(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, "# comment\n\ncam-1  aaaaaaaaaaaaaaaa\ncam-2 bbbbbbbbbbbbbbbb 1000,1001  # trailing\n")
    auth = Authenticator(load_tokens(path, OWNERS), False, OWNERS)
    bearer = (("authorization", "Bearer aaaaaaaaaaaaaaaa"),)
    assert auth.identify(Call(bearer)) == Identity("cam-1", OWNERS)
    assert auth.identify(Call((("authorization", "bearer bbbbbbbbbbbbbbbb"),))) == Identity(
        "cam-2", frozenset({1000, 1001})
    )
    for metadata in ((), (("authorization", "Bearer aaaaaaaaaaaaaaab"),), (("authorization", "aaaaaaaaaaaaaaaa"),)):
        with pytest.raises(Unauthenticated):
            auth.identify(Call(metadata))
    with pytest.raises(Unauthenticated):
        auth.identify(Call((("authorization", "Bearer " + "a" * 100_000),)))


@pytest.mark.parametrize(
    ("text", "mode", "why"),
    [
        ("cam aaaaaaaaaaaaaaaa\n", 0o644, "chmod 600"),
        ("cam short\n", 0o600, "16 to 512"),
        ("cam aaaaaaaaaaaaaaaa\ncam bbbbbbbbbbbbbbbb\n", 0o600, "twice"),
        ("cam aaaaaaaaaaaaaaaa\nother aaaaaaaaaaaaaaaa\n", 0o600, "twice"),
        (f"{ANONYMOUS} aaaaaaaaaaaaaaaa\n", 0o600, "reserved"),
        ("cam aaaaaaaaaaaaaaaa root\n", 0o600, "numeric uids"),
        ("c/m aaaaaaaaaaaaaaaa\n", 0o600, "plain identity name"),
        ("# nobody\n", 0o600, "names no caller"),
    ],
)
def test_a_tokens_file_that_cannot_be_trusted_or_read_is_refused(
    tmp_path: Path, text: str, mode: int, why: str
) -> None:
    with pytest.raises(RuntimeError, match=why):
        load_tokens(tokens_file(tmp_path, text, mode), OWNERS)


def test_a_symlinked_tokens_file_is_refused(tmp_path: Path) -> None:
    target = tokens_file(tmp_path, "cam aaaaaaaaaaaaaaaa\n")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        load_tokens(tmp_path / "link", OWNERS)


def test_a_hash_sign_inside_a_token_is_part_of_it(tmp_path: Path) -> None:
    path = tokens_file(tmp_path, "# a comment\ncam a#bcdefghijklmnop  # and a trailing one\n")
    auth = Authenticator(load_tokens(path, OWNERS), False, OWNERS)
    assert auth.identify(Call((("authorization", "Bearer a#bcdefghijklmnop"),))).name == "cam"


def test_client_certificates_and_anonymous_callers() -> None:
    certificates = Authenticator(None, True, OWNERS)
    assert certificates.identify(Call(common_name=b"camera-7")) == Identity("camera-7", OWNERS)
    with pytest.raises(Unauthenticated):
        certificates.identify(Call())
    with pytest.raises(Unauthenticated, match="reserved"):  # it would pass for the anonymous callers' rights
        certificates.identify(Call(common_name=ANONYMOUS.encode()))
    assert Authenticator(None, False, OWNERS).identify(Call()) == Identity(ANONYMOUS, OWNERS)
