"""The link between a gRPC front process and the main process: framed, multiplexed calls.

One stream socket pair per front process. The frames are ``infer_proto.framing``'s (the local
socket's clients speak them too, ``front.local``); call 0 carries the link's own frames
(``CONFIG``, ``READY``, ``STOP``). A call goes:

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
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import cast

from infer_proto.framing import HEADER, Kind, decode_call_start, encode_call_start

log = logging.getLogger(__name__)


class Link(asyncio.Protocol):
    """One end of a link: ``send`` frames, ``on_frame(call, kind, payload)`` for each received,
    ``on_lost()`` once when the other end is gone."""

    def __init__(self, on_frame: Callable[[int, int, bytes], None], on_lost: Callable[[], None],
                 max_payload: int | None = None) -> None:  # fmt: skip
        self._on_frame, self._on_lost, self._max_payload = on_frame, on_lost, max_payload
        self._transport: asyncio.Transport | None = None
        self._received = bytearray()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False
        self.dropped = False  # by ``drop``: nothing more is read or sent
        self._head_admitted = False  # the frame at the start of the buffer passed ``admit``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's or uvloop's (whose transports are not asyncio.Transport subclasses): both have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def admit(self, call: int, kind: int, length: int) -> str | None:
        """Checked once per frame as soon as its header is in, before its payload is taken in: why
        the other end may not send it (the link is then dropped), or None."""
        if self._max_payload is not None and length > self._max_payload:
            return f"a frame of {length} bytes (at most {self._max_payload})"
        return None

    def data_received(self, data: bytes) -> None:
        buffer = self._received
        buffer += data
        offset, size = 0, len(buffer)
        with memoryview(buffer) as view:  # a payload is copied once (a bytearray's slice is a copy too)
            while size - offset >= HEADER.size and not self.dropped:
                call, kind, length = HEADER.unpack_from(buffer, offset)
                if not (offset == 0 and self._head_admitted) and (reason := self.admit(call, kind, length)):
                    self.drop(reason)
                    return
                end = offset + HEADER.size + length
                if end > size:
                    break
                payload = bytes(view[offset + HEADER.size : end])
                offset = end
                self._on_frame(call, kind, payload)
        if offset:
            del buffer[:offset]
        self._head_admitted = len(buffer) >= HEADER.size  # an incomplete frame waits there, admitted

    def send(self, call: int, kind: Kind, payload: bytes = b"", now: bool = False) -> None:
        """Queue one frame; every frame queued in this turn of the loop goes out in one write, or
        (``now``) every frame queued so far goes out with this one at once."""
        if self.closed or self.dropped:
            return
        self._outgoing.append(HEADER.pack(call, kind, len(payload)))
        if payload:
            self._outgoing.append(payload)
        if now:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        frames, self._outgoing = self._outgoing, []
        if frames and self._transport is not None and not self.closed and not self.dropped:
            self._transport.write(b"".join(frames))

    def drop(self, reason: str) -> None:
        """Close at once, unsent frames and all: the other end broke the protocol (``reason``)."""
        if not self.dropped and self._transport is not None:
            self.dropped = True
            log.warning("dropping a link connection: %s", reason)
            self._outgoing.clear()
            self._transport.abort()

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._flush()
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self._on_lost()


def encode_start(method: str, metadata: Iterable[tuple[str, str | bytes]], peer: str,
                 auth_context: Mapping[str, Iterable[bytes]]) -> bytes:  # fmt: skip
    """A relayed call's start: a client's start, with the client's peer and its auth context's
    values (in base64)."""
    auth = {key: [base64.b64encode(value).decode() for value in values] for key, values in auth_context.items()}
    return encode_call_start(method, metadata, peer=peer, auth=auth)


def decode_start(payload: bytes) -> tuple[str, tuple[tuple[str, str | bytes], ...], str, dict[str, list[bytes]]]:
    """``encode_start``'s inverse: method, metadata, peer, auth context."""
    method, metadata, start = decode_call_start(payload)
    auth = {key: [base64.b64decode(value) for value in values] for key, values in start["auth"].items()}
    return method, metadata, start["peer"], auth
