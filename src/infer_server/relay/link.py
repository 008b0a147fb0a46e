"""The link between a gRPC front process and the main process: framed, multiplexed calls.

One stream socket pair per front process. A frame is a header (call id, kind, payload length)
and its payload; call 0 carries the link's own frames (``CONFIG``, ``READY``, ``STOP``). A call
goes:

    front → main   START {method, metadata, peer, auth context}
    main → front   WANT               (read one more request message from the client)
    front → main   MESSAGE | HALF_CLOSE  (the message read, or: the client sent its last)
    main → front   MESSAGE            (a response; the front writes it to the client, then:)
    front → main   ACK
    main → front   END {code, details}
    front → main   CANCEL             (instead of the rest: the client went away)

Requests are read from the client only when the main process asks (one ahead of the handler), so
gRPC's flow control still holds a client back whose calls the main process does not read — a call
the gate refuses is answered without a byte of its message read. A response write in the main
process returns when the front process has written it to the client's stream (its ``ACK``), as a
grpc.aio write returns when gRPC core took it: a stream acknowledges results to the registry only
then, so a front process that dies takes no result with it that is not sent again.

Frames are gathered and written once per turn of the event loop: under load, many calls' frames
share one ``send``.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import json
import struct
from collections.abc import Callable, Iterable, Mapping

HEADER = struct.Struct("<QBI")  # call id (never reused in a process's life), kind, payload length
LINK = 0  # the call id of the link's own frames


class Kind(enum.IntEnum):
    CONFIG = 0  # main → front: the server's settings (JSON), first and once
    READY = 1  # front → main: the TCP port it serves (decimal)
    STOP = 2  # main → front: stop serving, open calls may end within this many seconds (decimal)
    START = 3  # front → main: a call began (``encode_start``)
    MESSAGE = 4  # either way: one serialized message
    WANT = 5  # main → front: read one more request message
    HALF_CLOSE = 6  # front → main: the client sent its last message
    ACK = 7  # front → main: a response message was written to the client
    END = 8  # main → front: the call's status (``encode_end``)
    CANCEL = 9  # front → main: the call ended on the client's side (gone, deadline, front stopping)


class Link(asyncio.Protocol):
    """One end of a link: ``send`` frames, ``on_frame(call, kind, payload)`` for each received,
    ``on_lost()`` once when the other end is gone."""

    def __init__(self, on_frame: Callable[[int, int, bytes], None], on_lost: Callable[[], None]) -> None:
        self._on_frame, self._on_lost = on_frame, on_lost
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._received
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= HEADER.size:
            call, kind, length = HEADER.unpack_from(buffer, offset)
            end = offset + HEADER.size + length
            if end > size:
                break
            payload = bytes(buffer[offset + HEADER.size : end])
            offset = end
            self._on_frame(call, kind, payload)
        if offset:
            del buffer[:offset]

    def send(self, call: int, kind: Kind, payload: bytes = b"") -> None:
        """Queue one frame; every frame queued in this turn of the loop goes out in one write."""
        if self.closed:
            return
        self._outgoing.append(HEADER.pack(call, kind, len(payload)))
        if payload:
            self._outgoing.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        frames, self._outgoing = self._outgoing, []
        if self._transport is not None and not self.closed:
            self._transport.write(b"".join(frames))

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._flush()
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._on_lost()


def _text(value: str | bytes) -> str:
    return base64.b64encode(value).decode() if isinstance(value, bytes) else value


def encode_start(method: str, metadata: Iterable[tuple[str, str | bytes]], peer: str,
                 auth_context: Mapping[str, Iterable[bytes]]) -> bytes:  # fmt: skip
    """A call's start: binary metadata (``-bin`` keys) and the auth context's values in base64."""
    return json.dumps({
        "method": method,
        "metadata": [(key, _text(value)) for key, value in metadata],
        "peer": peer,
        "auth": {key: [_text(value) for value in values] for key, values in auth_context.items()},
    }).encode()  # fmt: skip


def decode_start(payload: bytes) -> tuple[str, tuple[tuple[str, str | bytes], ...], str, dict[str, list[bytes]]]:
    """``encode_start``'s inverse: method, metadata, peer, auth context."""
    start = json.loads(payload)
    metadata = tuple(
        (key, base64.b64decode(value) if key.endswith("-bin") else value) for key, value in start["metadata"]
    )
    auth = {key: [base64.b64decode(value) for value in values] for key, values in start["auth"].items()}
    return start["method"], metadata, start["peer"], auth


def encode_end(code: int, details: str) -> bytes:
    return json.dumps([code, details]).encode()


def decode_end(payload: bytes) -> tuple[int, str]:
    code, details = json.loads(payload)
    return int(code), str(details)
