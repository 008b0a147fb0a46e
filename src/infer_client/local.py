"""Sessions over the server's local socket (``--local-socket``): the Session call without gRPC.

Used by ``InferClient`` when it is given ``local_socket`` (``session()`` and ``detect``:
``LocalSession``), and by ``AsyncInferClient`` (its ``AsyncSession`` over ``local_async.AsyncLocalCall``), in
the client application's process. The client connects to the server's Unix-domain socket and speaks
``infer_proto.framing``'s frames itself: ``START`` (the Session method and the credentials'
metadata), each push as a ``MESSAGE`` while the server's window allows it (each ``WANT`` grants
its payload's number of bytes; a push may be sent while fewer bytes were sent than granted, so a
client that pushes small messages hears from the server's flow control once in hundreds of pushes),
``HALF_CLOSE`` on ``close``; the server sends ``SessionReply`` messages and an ``END`` with the call's status.

No thread of its own: a thread that waits for an answer or results reads the socket itself while
the others wait on a condition, so a push and its results cost a ``send`` and a ``recv`` or two,
where gRPC's blocking stream hands each message between three threads. Same surface and
guarantees as ``session.Session`` (it shares ``BlockingSession`` and ``SessionBook`` with it).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import grpc

from infer_client._protocol import MAX_RECEIVE_BYTES, SESSION, ImageSource, InferError, PushedBatches
from infer_client.results import read_reply, status_code
from infer_client.session import _ENDED, BlockingSession, Metadata, SessionBook, _accepted
from infer_proto import infer_pb2
from infer_proto.framing import HEADER, Kind, decode_end, encode_call_start, frame

CALL = 1  # the one call of this connection
_PUSH = infer_pb2.SessionRequest.DESCRIPTOR.fields_by_name["push"].number
_DATA = infer_pb2.PushDataRequest.DESCRIPTOR.fields_by_name["data"].number
_MAX_PARTS = 512  # of one sendmsg (the kernel takes up to IOV_MAX, 1024)
_RECEIVE_CHUNK = 64 * 1024
_RECEIVE_SLICE_S = 0.25
_RECEIVE_SLICE_MS = int(_RECEIVE_SLICE_S * 1000)


def message_parts(request: infer_pb2.SessionRequest, blobs: Sequence[bytes] | None) -> list[bytes]:
    """The ``MESSAGE`` frame of ``request`` with ``blobs`` as its push's ``data``, in parts: the
    bytes ``request.push.data = b"".join(blobs)`` and ``SerializeToString()`` would give the server,
    without copying the images (three copies of a batch, each into fresh pages: most of an inline
    client's CPU). Protobuf merges a second occurrence of a message field into the first, so the
    data goes in a second ``push`` holding only it."""
    head = request.SerializeToString()
    if not blobs:
        return [HEADER.pack(CALL, Kind.MESSAGE, len(head)), head]
    size = sum(map(len, blobs))
    data = _key(_DATA, size)
    push = _key(_PUSH, len(data) + size) + data
    images = list(blobs) if len(blobs) < _MAX_PARTS else [b"".join(blobs)]
    return [HEADER.pack(CALL, Kind.MESSAGE, len(head) + len(push) + size), head, push, *images]


def _key(field: int, length: int) -> bytes:
    """A length-delimited field's tag and length (protobuf's wire format: varints)."""
    out = bytearray()
    for value in (field << 3 | 2, length):
        while value > 0x7F:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket: the kernel's word (SO_PEERCRED)."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]


def _served_by(sock: socket.socket, uid: int | None) -> int:
    """The serving uid, checked against ``uid`` (a shard's socket must be served by shard 0's user:
    not by another user who bound the path while the shard was starting again)."""
    found = peer_uid(sock)
    if uid is not None and found != uid:
        raise ConnectionRefusedError(f"it is served by uid {found}, not the server's uid {uid}")
    return found


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))


def start_frame(method: str, metadata: Metadata) -> bytes:
    """The ``START`` of this connection's one call: the method and the credentials' metadata."""
    return frame(CALL, Kind.START, encode_call_start(method, metadata or ()))


def unexpected(call: int, length: int) -> str | None:
    """Why a frame the server sent cannot be taken in (a call not ours, or too long), or None."""
    return f"a frame of {length} bytes for call {call}" if length > MAX_RECEIVE_BYTES or call != CALL else None


def read_frames(buffer: bytearray) -> Iterator[tuple[int, bytes]]:
    """The complete frames at the start of ``buffer`` (kind, payload), each removed from it once
    read; ``ValueError`` at one the server may not send (``unexpected``)."""
    offset = 0
    try:
        while len(buffer) - offset >= HEADER.size:
            call, kind, length = HEADER.unpack_from(buffer, offset)
            if reason := unexpected(call, length):
                raise ValueError(reason)
            if len(buffer) - offset - HEADER.size < length:
                break
            yield kind, bytes(buffer[offset + HEADER.size : offset + HEADER.size + length])
            offset += HEADER.size + length
    finally:
        del buffer[:offset]


def ended_with(payload: bytes) -> InferError | None:
    """An ``END``'s status as an error; None if the call ended OK."""
    code, details = decode_end(payload)
    return InferError(status_code(code), details) if code else None


class LocalSession(BlockingSession):
    """One Session call on its own connection to the local socket; threads may share it. Close it
    (or ``with``)."""

    def __init__(
        self, path: str | os.PathLike[str], transport: str, pushed: PushedBatches, timeout: float | None,
        metadata: Metadata = None, server_uid: int | None = None,
    ) -> None:  # fmt: skip
        """``server_uid``: the uid the server must run as (checked before anything is sent)."""
        self._transport, self._files, self._timeout = transport, pushed.files, timeout
        self._cond = threading.Condition()
        self._sending = threading.RLock()
        self._book = SessionBook(pushed)
        self._reading = False  # a thread is reading the socket
        self._window = 0  # request bytes the server granted and this session did not send yet
        self._ended = self._closing = False  # END received; HALF_CLOSE sent
        self._received = bytearray()
        self._shards: infer_pb2.Shards | None = None  # the server's first reply says
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(os.fspath(path))
            self.server_uid = _served_by(self._sock, server_uid)
            # Blocking from now on, with the kernel's timeouts: a receive (made once poll saw data,
            # see _receive) waits a slice at most; a send that stalls for the whole timeout fails the
            # session.
            self._sock.settimeout(None)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_RECEIVE_SLICE_S))
            if timeout is not None:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
            self._sock.sendall(start_frame(SESSION, metadata))
            self._readable = select.poll()  # see _receive
            self._readable.register(self._sock, select.POLLIN)
        except OSError as exc:
            self._sock.close()
            raise InferError(grpc.StatusCode.UNAVAILABLE, f"cannot reach the local socket {path}: {exc}") from None

    def push(
        self, images: Sequence[ImageSource], names: Sequence[str] | None = None, request_id: str | None = None,
        *, defer_answer: bool = False,
    ) -> str:  # fmt: skip
        """Hand over a batch (paths or encoded bytes); returns its batch id once admitted."""
        tag, request, blobs = self._booked(images, names, request_id, defer_answer, embed=False)
        message = message_parts(request, blobs)
        size = sum(map(len, message))
        with self._sending:  # window taken and message sent in one order: the server counts them so
            if self._closing:
                self._break(InferError(grpc.StatusCode.CANCELLED, "the session is closed"))
                raise self._book.error  # type: ignore[misc]
            try:
                self._wait(lambda: self._take_window(size), self._timeout)
            except InferError as exc:  # the server reads no more pushes: the stream is of no use
                self._break(exc)
                raise
            self._send(message)
        return _accepted(self._wait(lambda: self._book.answer(tag), self._timeout))

    def shards(self) -> infer_pb2.Shards:
        """How the server is divided (``--shards``): the first thing it says on a new session."""
        return self._wait(lambda: self._shards, self._timeout)

    def cancel(self) -> None:
        """Abandon the call now: waiters get CANCELLED; results it did not receive stay their
        batches', for ``pull`` or a push repeated with its request_id."""
        self._break(InferError(grpc.StatusCode.CANCELLED, "the session was cancelled"))

    def close(self, timeout: float = 5.0) -> None:
        """Stop pushing; wait (bounded) for results still owed, then end the call."""
        try:
            if not self._sending.acquire(timeout=-1 if timeout is None else timeout):  # a push waits for the window
                return
            try:
                self._closing = True
                self._send(frame(CALL, Kind.HALF_CLOSE))
            finally:
                self._sending.release()
            self._wait(lambda: True if self._ended else None, timeout)
        except InferError:
            pass  # the call had ended, or ends now: the socket closes below (the server cancels it)
        finally:
            self._break(InferError(grpc.StatusCode.CANCELLED, _ENDED))

    def _take_window(self, size: int) -> bool | None:
        if self._window > 0:
            self._window -= size
            return True
        return None

    def _send(self, data: bytes | list[bytes]) -> None:
        """Send ``data`` whole (in parts: one ``sendmsg``, no copy into one buffer)."""
        try:
            with self._sending:  # reentrant: push holds it already
                if isinstance(data, bytes):
                    self._sock.sendall(data)
                elif (sent := self._sock.sendmsg(data)) < sum(map(len, data)):  # cut short by a signal
                    self._sock.sendall(b"".join(data)[sent:])
        except OSError as exc:
            error = InferError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc}")
            self._break(error)
            raise error from None

    def _break(self, error: InferError) -> None:
        with self._cond:
            self._book.fail(error)
            self._cond.notify_all()
        with contextlib.suppress(OSError):  # wakes a thread waiting in poll (closing does not)
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _until_news(self, left: float | None) -> None:
        """Read the socket, unless another thread does: then wait for it to say what it read."""
        if self._reading:
            self._cond.wait(left)
        else:
            self._read(left)

    def _read(self, timeout: float | None) -> None:
        """Receive what the server sent (waiting up to ``timeout``) and take it in; holds the lock
        only to take it in."""
        self._reading = True
        self._cond.release()
        try:
            frames, error = self._receive(timeout), None
        except (OSError, ValueError) as exc:
            frames, error = [], InferError(grpc.StatusCode.UNAVAILABLE, f"the local socket failed: {exc}")
        finally:  # also on KeyboardInterrupt: another waiter takes over the reading
            self._cond.acquire()
            self._reading = False
            self._cond.notify_all()
        try:
            for kind, payload in frames:
                self._take(kind, payload)
        except Exception as exc:  # a reply that does not parse: nothing after it can be trusted
            error = InferError(grpc.StatusCode.INTERNAL, f"a malformed reply on the local socket: {exc!r}")
        if error is not None:
            self._book.fail(error)
        self._cond.notify_all()

    def _receive(self, timeout: float | None) -> list[tuple[int, bytes]]:
        """The complete frames received, at least one unless ``timeout`` passed (then none).

        It waits in ``poll``, not in ``recv``: a Unix socket wakes a thread blocked in ``recv``
        whenever the server reads what this client sent (buffer space wakes the socket's readers and
        writers alike), a wake-up and two context switches per push for nothing; ``poll`` asks for
        data only (``tests/integration/test_local_socket.py`` counts the waits). A thread that
        breaks the session shuts the socket down, which ends the wait at once.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (frames := list(read_frames(self._received))):
            if self._sock.fileno() < 0:  # closed by another thread: its number may be another file's now
                raise ConnectionError("the local socket was closed")
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return []
            wait_ms = _RECEIVE_SLICE_MS if left is None else min(_RECEIVE_SLICE_MS, math.ceil(left * 1000))
            if not self._readable.poll(wait_ms):
                continue
            try:
                chunk = self._sock.recv(_RECEIVE_CHUNK)
            except BlockingIOError:  # nothing to read after all (SO_RCVTIMEO)
                continue
            if not chunk:
                raise ConnectionError("the server closed the local socket")
            self._received += chunk
        return frames

    def _take(self, kind: int, payload: bytes) -> None:
        if kind == Kind.WANT:
            self._window += int(payload)
        elif kind == Kind.MESSAGE:
            reply, results = read_reply(payload)
            if reply.HasField("shards"):
                self._shards = reply.shards
            self._book.absorb(reply, results)
        elif kind == Kind.END:
            self._ended = True
            self._book.fail(ended_with(payload) or InferError(grpc.StatusCode.CANCELLED, _ENDED))


__all__ = ["LocalSession", "message_parts", "peer_uid"]
