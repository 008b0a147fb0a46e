"""Where the server listens and gRPC core's limits: TCP (TLS when configured), a Unix socket, keepalive.

Used by the fronts (``front.fronts``; a front process, ``relay.process``) before they serve, and
by the local socket (``front.local``) for its path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import stat
from pathlib import Path

import grpc
import grpc.aio

from infer_server.settings import ServerSettings

log = logging.getLogger(__name__)


def channel_options(s: ServerSettings) -> list[tuple[str, int]]:
    """gRPC core's limits: messages (``service.reader`` enforces ``max_message_bytes`` with a clear
    INVALID_ARGUMENT; up to twice that reaches it, beyond that gRPC answers RESOURCE_EXHAUSTED itself),
    and keepalive: the server pings connections that hold calls every ``keepalive_s`` and drops one
    whose ping goes unanswered for ``keepalive_timeout_s`` (gRPC's own ping timeout is a minute:
    it is set too), so a frozen client's streams come back; a client may ping at most every 10 s,
    and only while it has calls open (else the connection is closed)."""
    keepalive_ms = int(s.keepalive_s * 1000)
    return [
        ("grpc.max_receive_message_length", 2 * s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.http2.ping_timeout_ms", int(s.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging a connection whose streams send nothing
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
    ]


def listen(server: grpc.aio.Server, s: ServerSettings) -> int:
    """Bind TCP (TLS when configured) and the Unix socket if any; returns the TCP port."""
    host = f"[{s.host}]" if ":" in s.host and not s.host.startswith("[") else s.host
    if s.tls_cert is not None and s.tls_key is not None:
        ca = s.tls_client_ca.read_bytes() if s.tls_client_ca else None
        key_and_chain = [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())]
        credentials = grpc.ssl_server_credentials(key_and_chain, ca, require_client_auth=ca is not None)
        port = server.add_secure_port(f"{host}:{s.port}", credentials)
    else:
        port = server.add_insecure_port(f"{host}:{s.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {host}:{s.port}")
    if s.unix_socket is not None:
        _listen_unix(server, s.unix_socket)
    return port


class OwnedSocket:
    """A socket path this server bound: ``claim`` right after binding remembers which file it is,
    and ``remove`` removes it only if it is still that file. A server that failed to start, or one
    whose socket another server replaced, leaves the other's socket alone."""

    def __init__(self, path: os.PathLike[str] | None) -> None:
        self._path = path
        self._file: tuple[int, int] | None = None

    def claim(self) -> None:
        if self._path is not None:
            st = os.lstat(self._path)
            self._file = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        if self._path is None or self._file is None:
            return
        with contextlib.suppress(OSError):
            st = os.lstat(self._path)
            if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self._file:
                os.unlink(self._path)


def replace_leftover_socket(path: Path, flag: str) -> None:
    """A leftover socket of an earlier run at ``path`` is removed; a socket a live server listens
    on, or anything that is not a socket, is refused."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise RuntimeError(f"{path} exists and is not a socket: remove it or choose another {flag}")
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:  # nobody listens: an earlier run's
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except FileNotFoundError:
        return
    except OSError as exc:  # a full accept queue (EAGAIN) is a live server too; no permission: not ours
        raise RuntimeError(f"{path} is a socket this server cannot tell is unused ({exc.strerror}): "
                           f"remove it or choose another {flag}") from None  # fmt: skip
    finally:
        probe.close()
    raise RuntimeError(f"{path} is a socket a running server listens on: stop it or choose another {flag}")


def _listen_unix(server: grpc.aio.Server, path: Path) -> None:
    """The Unix socket, created 0600 (the umask covers the window between bind and chmod); a
    leftover socket of an earlier run is replaced, anything else in its place is refused."""
    replace_leftover_socket(path, "--unix-socket")
    old = os.umask(0o177)
    try:
        bound = server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old)
    if bound == 0:
        raise RuntimeError(f"could not listen on the Unix socket {path}")


def raise_descriptor_limit(needed: int) -> None:
    """The front holds every in-flight batch's file open: lift the soft limit on descriptors to the
    hard one if it is lower than ``needed``, and say so if even the hard one is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        soft = hard if hard == resource.RLIM_INFINITY else max(soft, min(hard, needed))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("only %d file descriptors allowed (ulimit -n), %d wanted: lower --max-inflight-images "
                    "or raise the hard limit", soft, needed)  # fmt: skip
