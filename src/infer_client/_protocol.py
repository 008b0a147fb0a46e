"""The request builder both clients share: transport choice, batch files, requests, errors.

Used by ``InferClient`` (``client.py``) and ``AsyncInferClient`` (``aio.py``) in the client
application's process; neither client builds a request or touches tmpfs any other way. Blocking
file work (``prepare_push``) runs inline in the sync client and in a thread in the asyncio one.

Tmpfs transport: the images are written back to back into one file in the shared directory
(``_batch_files.BatchFiles``). When that file system is full — over ``BatchFiles.full_at`` of it
in use, or a write fails with ENOSPC or EDQUOT — the push goes inline instead of failing; the
client says so once in its log and counts it (``inline_fallbacks``). The client owns that file:
:class:`PushedBatches` hands it back to ``BatchFiles``, which rewrites it in place for a later
batch once every result of its batch arrived, and deletes it when the client closes or the push
failed (``BatchFiles.discard``).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import grpc

from infer_client._batch_files import BatchFiles, ImageSource
from infer_client.results import ImageResult
from infer_proto import infer_pb2
from infer_proto.addresses import is_loopback

Transport = Literal["auto", "tmpfs", "inline"]

DEFAULT_SHM_DIR = "/dev/shm/infer"
# Inline batches travel in one message; results are small.
MAX_SEND_BYTES = 257 * 1024 * 1024
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
]
SESSION = "/infer.v1.InferenceService/Session"
_SERIALIZE_REQUEST = infer_pb2.SessionRequest.SerializeToString


def session_stub(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """What ``Session`` and ``AsyncSession`` ask of a stub (``Session(...)``), on ``channel``: the
    call without a deserializer, whose replies are their bytes, which a session reads itself
    (``results.read_reply``: its results straight into records)."""
    return SimpleNamespace(Session=channel.stream_stream(SESSION, request_serializer=_SERIALIZE_REQUEST))


class InferError(Exception):
    """An RPC failed: ``code`` is the gRPC status code, ``message`` the server's detail."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc(cls, exc: grpc.RpcError) -> InferError:
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return cls(_code(exc), details or "")


def _code(exc: grpc.RpcError) -> grpc.StatusCode:
    return (exc.code() if hasattr(exc, "code") else None) or grpc.StatusCode.UNKNOWN


class ReadyWait:
    """One ``wait_ready``: how long each health watch may take, and what a failed one means.

    UNAVAILABLE is "not ready yet", not an answer: the watch went out on a connection that was dying
    (the server or one of its front processes restarting; gRPC reuses a connection whose close it has
    not read yet, ``wait_for_ready`` or not), so the wait goes on, with pauses growing from 0.05 to
    1 s, until ``timeout`` (None: for good). Any other error ends it.
    """

    _PAUSES_S = (0.05, 0.1, 0.2, 0.5, 1.0)

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._failures = 0
        self._last: grpc.RpcError | None = None  # the last watch that failed UNAVAILABLE

    def left(self) -> float | None:
        """The next watch's timeout: what is left of the wait (None: no deadline)."""
        return None if self._deadline is None else max(self._deadline - time.monotonic(), 0.0)

    def pause_after(self, exc: grpc.RpcError) -> float:
        """How long to wait before the next watch after one failed with ``exc``; raises the error
        the wait ends with instead (outside gRPC's own: the caller raises nothing in its except)."""
        code, left = _code(exc), self.left()
        if code == grpc.StatusCode.UNAVAILABLE:
            self._last = exc
        out_of_time = code == grpc.StatusCode.DEADLINE_EXCEEDED or (code == grpc.StatusCode.UNAVAILABLE and left == 0)
        if out_of_time and self.timeout is not None:
            after = "" if self._last is None else f" (last: {InferError.from_rpc(self._last)})"
            raise InferError(grpc.StatusCode.DEADLINE_EXCEEDED, f"server not ready within {self.timeout:g}s{after}")
        if code != grpc.StatusCode.UNAVAILABLE:
            raise InferError.from_rpc(exc)
        pause = self._PAUSES_S[min(self._failures, len(self._PAUSES_S) - 1)]
        self._failures += 1
        return pause if left is None else min(pause, left)


def is_local_target(target: str) -> bool:
    """True for unix sockets and loopback hosts (localhost, 127.x, [::1]), with or without scheme."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return True
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if t.startswith(scheme):
            t = t[len(scheme) :]
            break
    if t.startswith("["):
        host = t[1 : t.find("]")]
    elif t.count(":") == 1:
        host = t.rsplit(":", 1)[0]
    else:
        host = t  # no port, or a bare IPv6 address
    return is_loopback(host)


def resolve_transport(transport: Transport, target: str, shm_dir: str | os.PathLike[str]) -> str:
    """``tmpfs`` or ``inline``: ``auto`` picks tmpfs for a local server and a writable shm_dir."""
    if transport != "auto":
        return transport
    local = is_local_target(target)
    return "tmpfs" if local and os.path.isdir(shm_dir) and os.access(shm_dir, os.W_OK | os.X_OK) else "inline"


@dataclass(frozen=True)
class Credentials:
    """How a client proves who it is to a server that asks (docs/security.md).

    ``token``: a bearer token, sent as ``authorization`` metadata on every call but health.
    ``root_certificates``: PEM of the CA that signed the server's certificate: the channel uses
    TLS (with the system's roots when it is ``b""``). ``certificate_chain`` and ``private_key``:
    this client's certificate, for a server that requires mutual TLS.
    """

    token: str | None = None
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Credentials:
        """From ``INFER_TOKEN`` (or a file named by ``INFER_TOKEN_FILE``), ``INFER_TLS_CA``,
        ``INFER_TLS_CERT`` and ``INFER_TLS_KEY`` (file paths); what is not set stays off."""

        def read(name: str) -> bytes | None:
            return Path(environ[name]).read_bytes() if environ.get(name) else None

        token = environ.get("INFER_TOKEN") or None
        if token is None and (token_file := read("INFER_TOKEN_FILE")) is not None:
            token = token_file.decode().strip()
        return cls(token, read("INFER_TLS_CA"), read("INFER_TLS_CERT"), read("INFER_TLS_KEY"))

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Per-call metadata (the token), or None."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    @property
    def tls(self) -> grpc.ChannelCredentials | None:
        if self.root_certificates is None and self.certificate_chain is None:
            return None
        return grpc.ssl_channel_credentials(self.root_certificates or None, self.private_key, self.certificate_chain)


def open_channel(target: str, options: Sequence[tuple[str, Any]], credentials: Credentials, aio: bool = False) -> Any:
    """A channel to ``target``: TLS when the credentials say so, plaintext otherwise."""
    module: Any = grpc.aio if aio else grpc
    tls = credentials.tls
    if tls is None:
        return module.insecure_channel(target, options=options)
    return module.secure_channel(target, tls, options=options)


# The largest batch a full tmpfs sends inline instead: the server's default --max-message-bytes
# (64 MiB) less room for the rest of the request.
INLINE_FALLBACK_BYTES = 63 * 1024 * 1024


def _inline_size(images: Sequence[ImageSource]) -> int:
    return sum(len(img) if isinstance(img, bytes) else os.path.getsize(img) for img in images)


@dataclass(frozen=True)
class PreparedPush:
    request: infer_pb2.PushDataRequest
    owned_path: str | None  # the tmpfs batch file this client wrote, if any
    blobs: list[bytes] | None = None  # inline images not put into ``request`` (``embed=False``)


def _names(images: Sequence[ImageSource], names: Sequence[str] | None) -> list[str]:
    """The request's names: one per image, or none when every one is empty (the same to the server)."""
    if names is not None and len(names) != len(images):
        raise ValueError(f"got {len(names)} names for {len(images)} images")
    if names is None:
        names = ["" if isinstance(img, bytes) else os.path.basename(os.fspath(img)) for img in images]
    return list(names) if any(names) else []


def prepare_push(
    images: Sequence[ImageSource],
    names: Sequence[str] | None,
    request_id: str | None,
    transport: str,
    files: BatchFiles,
    embed: bool = True,
) -> PreparedPush:
    """Build a PushDataRequest; for tmpfs, write the batch file first (blocking). Inline images go
    into its ``data``, or with ``embed=False`` into ``blobs``, for a caller that sends them itself."""
    if not images:
        raise ValueError("a batch needs at least one image")
    request = infer_pb2.PushDataRequest(names=_names(images, names), request_id=request_id or "")
    if transport == "tmpfs":
        try:
            if files.nearly_full():
                raise OSError(errno.ENOSPC, f"over {files.full_at:.0%} in use")
            path, sizes = files.write(images)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or _inline_size(images) > INLINE_FALLBACK_BYTES:
                raise  # a batch too large for one message cannot go inline: the error says why
            files.fell_back(exc.strerror or str(exc))  # degrade to inline bytes rather than fail the call
        else:
            request.path = path
            request.sizes.extend(sizes)
            return PreparedPush(request, path)
    blobs = [img if isinstance(img, bytes) else Path(img).read_bytes() for img in images]
    request.sizes.extend(len(b) for b in blobs)
    if not embed:
        return PreparedPush(request, None, blobs)
    request.data = b"".join(blobs)
    return PreparedPush(request, None)


@dataclass
class _Pushed:
    path: str | None  # the tmpfs batch file, None for inline batches
    count: int
    seen: set[int] = field(default_factory=set)


class PushedBatches:
    """Batches this client pushed: their tmpfs file and the results that arrived (thread-safe).

    The file goes back to ``files`` for reuse once every result of its batch arrived, and is
    deleted on close. A result that arrives twice is dropped: the server hands a result out again
    when the stream it was being written to was cancelled mid-write, since it cannot know whether
    the write reached us.
    """

    def __init__(self, files: BatchFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._batches: dict[str, _Pushed] = {}

    def add(self, batch_id: str, path: str | None, count: int) -> None:
        with self._lock:
            duplicate = batch_id in self._batches
            if not duplicate:
                self._batches[batch_id] = _Pushed(path, count)
        if duplicate:
            # A retried request_id: the server reads one of the two files and this client cannot tell
            # which (pushes on two streams may be answered in either order), so this one is deleted,
            # never rewritten for a later batch while the server might still read it.
            self.files.discard(path)

    def accept(self, batch_id: str, index: int) -> bool:
        """False if this result already arrived; frees the batch file after the last one."""
        with self._lock:
            new, done = self._seen(batch_id, index)
        if done is not None:
            self.files.recycle(done.path)
        return new

    def accept_all(self, results: list[ImageResult]) -> list[ImageResult]:
        """``accept`` of each result, under the lock once: those to keep, in order."""
        kept, finished = [], []
        with self._lock:
            for result in results:
                new, done = self._seen(result.batch_id, result.index)
                if new:
                    kept.append(result)
                if done is not None:
                    finished.append(done)
        for done in finished:
            self.files.recycle(done.path)
        return kept

    def _seen(self, batch_id: str, index: int) -> tuple[bool, _Pushed | None]:
        """Under the lock: whether this result is new, and its batch once it was the last one (a
        batch not pushed by this client is not tracked: every result of it is new)."""
        entry = self._batches.get(batch_id)
        if entry is None:
            return True, None
        if index in entry.seen:
            return False, None
        entry.seen.add(index)
        if len(entry.seen) < entry.count:
            return True, None
        del self._batches[batch_id]
        return True, entry

    def remove_all(self) -> None:
        with self._lock:
            paths = [entry.path for entry in self._batches.values()]
            self._batches.clear()
        for path in paths:
            self.files.discard(path)
        self.files.remove_all()


def pull_request(batch_ids: str | Sequence[str]) -> infer_pb2.PullResultRequest:
    ids = [batch_ids] if isinstance(batch_ids, str) else list(batch_ids)
    return infer_pb2.PullResultRequest(batch_ids=ids)
