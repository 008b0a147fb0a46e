"""Who is calling: each RPC's identity, from a bearer token, a TLS client certificate, or neither.

Used by ``front.service`` on every ``InferenceService`` call (health and reflection stay open to
anyone who can connect: probes carry no credentials). An identity owns what it creates: its batch
ids, its request_ids, its results and its quotas (``front.batches``), and it names the users whose
files it may hand over by path (``file_owners``, checked by ``front.handoff``).

Where the identity comes from, first match:
  * ``--tokens-file``: every call must carry ``authorization: Bearer <token>``; the token names the
    identity. Tokens are compared as SHA-256 digests with ``hmac.compare_digest`` against every
    known one, with no early exit, so the time taken says nothing about how close a guess was.
  * ``--tls-client-ca`` (mutual TLS): the client certificate's subject common name.
  * neither: every caller is ``anonymous`` — one identity, so nothing separates callers' batches
    or quotas. That is the same-user, same-host default; see docs/security.md.

The tokens file holds one caller per line: ``<identity> <token> [<uid>,<uid>...]``; ``#`` starts a
comment. The optional uids are the owners of files that caller may push by path (default: the
server's ``--file-owners``, itself defaulting to the server's own uid). The file must belong to the
server's user (or root) and be unreadable by group and others, as ssh demands of its keys.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from infer_server.front.errors import Unauthenticated
from infer_server.settings import parse_uids

ANONYMOUS = "anonymous"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,63}")
_COMMENT = re.compile(r"(^|\s)#.*$")
_MIN_TOKEN_CHARS = 16
_MAX_TOKEN_BYTES = 512  # a presented token longer than any issued one is refused unhashed


@dataclass(frozen=True)
class Identity:
    """A caller: its name (audit lines, ownership, quotas) and whose files it may hand over."""

    name: str
    file_owners: frozenset[int]


class CallContext(Protocol):
    """What identification reads of an RPC (``grpc.aio.ServicerContext``)."""

    def invocation_metadata(self) -> Any: ...

    def auth_context(self) -> Mapping[str, Any]: ...


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def load_tokens(path: Path, default_owners: frozenset[int]) -> dict[bytes, Identity]:
    """The tokens file as {SHA-256 of token: identity}; ``RuntimeError`` saying what is wrong."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise RuntimeError(f"tokens file {path} is not a regular file")
        if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o077:
            raise RuntimeError(f"tokens file {path} must belong to the server's user and be private: chmod 600 {path}")
        text = f.read().decode("utf-8")
    tokens: dict[bytes, Identity] = {}
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        fields = _COMMENT.sub("", line).split()  # a '#' inside a token is part of it
        if not fields:
            continue
        where = f"tokens file {path}, line {number}"
        if len(fields) not in (2, 3) or not _NAME.fullmatch(fields[0]):
            raise RuntimeError(f"{where}: expected '<identity> <token> [<uid>,...]' with a plain identity name")
        name, token = fields[0], fields[1].encode()
        if len(token) < _MIN_TOKEN_CHARS or len(token) > _MAX_TOKEN_BYTES:
            raise RuntimeError(f"{where}: a token has {_MIN_TOKEN_CHARS} to {_MAX_TOKEN_BYTES} characters")
        owners = _uids(fields[2], where) if len(fields) == 3 else default_owners
        if name in names or name == ANONYMOUS or _digest(token) in tokens:
            raise RuntimeError(f"{where}: identity or token given twice (or the reserved name {ANONYMOUS!r})")
        names.add(name)
        tokens[_digest(token)] = Identity(name, owners)
    if not tokens:
        raise RuntimeError(f"tokens file {path} names no caller")
    return tokens


def _uids(text: str, where: str) -> frozenset[int]:
    try:
        return parse_uids(text)
    except ValueError as exc:
        raise RuntimeError(f"{where}: {exc}") from None


class Authenticator:
    """Maps a call's metadata and TLS peer to an ``Identity`` or refuses it (``Unauthenticated``)."""

    def __init__(
        self, tokens: Mapping[bytes, Identity] | None, client_certificates: bool, default_owners: frozenset[int]
    ) -> None:
        self._tokens = list((tokens or {}).items())
        self._client_certificates = client_certificates
        self._default_owners = default_owners
        self.anonymous = Identity(ANONYMOUS, default_owners)
        self.identifies = bool(self._tokens) or client_certificates  # callers can be told apart
        if self._tokens:
            self.mode = f"bearer tokens ({len(self._tokens)} identities)"
        elif client_certificates:
            self.mode = "TLS client certificates"
        else:
            self.mode = f"anonymous (no credentials asked; one identity: {ANONYMOUS!r})"

    def identify(self, context: CallContext) -> Identity:
        """The caller of one RPC; reads the metadata or the TLS peer only when they decide."""
        identity = self.identify_metadata(context.invocation_metadata() if self._tokens else None)
        return identity if identity is not None else self._from_certificate(context.auth_context())

    def identify_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> Identity | None:
        """The caller from its metadata alone (``front.gate``, before the request is read); None
        when only the TLS peer can tell (client certificates)."""
        if self._tokens:
            return self._from_token(metadata or ())
        return None if self._client_certificates else self.anonymous

    def _from_token(self, metadata: Iterable[tuple[str, Any]]) -> Identity:
        presented = None
        for key, value in metadata:
            if key == "authorization":
                presented = value
                break
        if presented is None:
            raise Unauthenticated("this server needs a bearer token (metadata 'authorization: Bearer <token>')")
        scheme, _, token = str(presented).partition(" ")
        if scheme.lower() != "bearer" or not token or len(token) > _MAX_TOKEN_BYTES:
            raise Unauthenticated("the authorization metadata must be 'Bearer <token>'")
        digest = _digest(token.strip().encode())
        found: Identity | None = None
        for known, identity in self._tokens:  # every entry, no early exit
            if hmac.compare_digest(known, digest):
                found = identity
        if found is None:
            raise Unauthenticated("unknown token")
        return found

    def _from_certificate(self, auth_context: Mapping[str, Any]) -> Identity:
        names = auth_context.get("x509_common_name") or ()
        if not names:  # a Unix-socket caller (no TLS there) or a certificate without a common name
            raise Unauthenticated("this server identifies callers by TLS client certificate; none was presented")
        name = names[0].decode("utf-8", "replace")
        if name == ANONYMOUS:  # the name of every caller of a server that asks for no credentials
            raise Unauthenticated(f"a certificate may not name the reserved identity {ANONYMOUS!r}")
        return Identity(name, self._default_owners)
