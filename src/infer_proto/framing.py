"""The frames of a link: between a gRPC front process and the main process (``relay.link``), and
between a client and the server's local socket (``front.local``, ``infer_client.local``).

A frame is a header (call id, kind, payload length) and its payload. Call 0 carries a front
process's link frames (``CONFIG``, ``READY``, ``STOP``); a client's connection has no call 0.
A call goes:

    caller → server   START {method, metadata}  (a front process adds the client's peer and auth)
    server → caller   WANT                       (send one more request message; to a local client: a
                                                 window of request bytes, ``front.local.LocalCall``)
    caller → server   MESSAGE | HALF_CLOSE       (a request message, as asked; or: there are no more)
    server → caller   MESSAGE                    (a response)
    caller → server   ACK                        (a front process: the response reached its client)
    server → caller   END {code, details}
    caller → server   CANCEL                     (instead of the rest: the call is abandoned)
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import struct
from collections.abc import Iterable
from typing import Any

HEADER = struct.Struct("<QBI")  # call id (never reused on a link), kind, payload length
LINK = 0  # the call id of a front process's link frames


class Kind(enum.IntEnum):
    CONFIG = 0  # main → front: the server's settings (JSON), first and once
    READY = 1  # front → main: the TCP port it serves (decimal)
    STOP = 2  # main → front: stop serving, open calls may end within this many seconds (decimal)
    START = 3  # caller → server: a call began
    MESSAGE = 4  # either way: one serialized message
    WANT = 5  # server → caller: send one more request message (a local client: this many more bytes)
    HALF_CLOSE = 6  # caller → server: the client sent its last message
    ACK = 7  # front → main: a response message was written to the client
    END = 8  # server → caller: the call's status (``encode_end``)
    CANCEL = 9  # caller → server: the call ended on the client's side (gone, deadline, front stopping)


def frame(call: int, kind: Kind, payload: bytes = b"") -> bytes:
    return HEADER.pack(call, kind, len(payload)) + payload


def encode_call_start(method: str, metadata: Iterable[tuple[str, str | bytes]], **fields: Any) -> bytes:
    """A call's ``START``: the method and the metadata (``-bin`` values in base64), and what else a
    front process adds (``relay.link.encode_start``: the client's peer and auth context)."""
    pairs = [(key, base64.b64encode(value).decode() if isinstance(value, bytes) else value) for key, value in metadata]
    return json.dumps({"method": method, "metadata": pairs, **fields}).encode()


def decode_call_start(payload: bytes) -> tuple[str, tuple[tuple[str, str | bytes], ...], dict[str, Any]]:
    """``encode_call_start``'s inverse, strict enough for a payload nobody vouches for (a local
    socket's client): method, metadata and the whole start (whose other fields only a front
    process's link may be believed about); ``ValueError`` if malformed."""
    try:
        start = json.loads(payload)
        method, pairs = start["method"], start.get("metadata", [])
        if not isinstance(method, str) or not isinstance(pairs, list):
            raise ValueError("a start is {method, metadata}")
        metadata: list[tuple[str, str | bytes]] = []
        for key, value in pairs:
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError("metadata is a list of [key, value] strings")
            metadata.append((key, base64.b64decode(value, validate=True) if key.endswith("-bin") else value))
    except (KeyError, TypeError, AttributeError, RecursionError, binascii.Error, json.JSONDecodeError,
            UnicodeDecodeError) as exc:  # fmt: skip
        raise ValueError(f"a malformed start: {exc!r}") from None
    return method, tuple(metadata), start


def encode_end(code: int, details: str) -> bytes:
    return json.dumps([code, details]).encode()


def decode_end(payload: bytes) -> tuple[int, str]:
    code, details = json.loads(payload)
    return int(code), str(details)
