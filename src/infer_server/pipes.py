"""The pipes between the server and its workers, read a pipeful at a time.

Both directions carry ``messages.dumps``' messages in ``multiprocessing.Connection.send_bytes``'
framing (a 4-byte big-endian length, or -1 and an 8-byte one, then the message). Reading them with
``Connection.recv_bytes`` costs two system calls and a buffer per message, and telling whether
another one follows costs a ``poll``; ``FrameReader`` takes whatever the pipe holds in one read and
splits it into whole messages, keeping a message cut short by the read for the next one. The
server's loop reads each worker's answers this way (``supervisor.channels.ResultReader``), and
each worker its inbox (``stage.gather``), where the pool writes every chunk one turn of its loop
hands it in one write.
"""

from __future__ import annotations

import os
import struct

READ_BYTES = 1 << 18  # taken from a pipe per read: hundreds of messages
_LENGTH, _LONG_LENGTH = struct.Struct("!i"), struct.Struct("!Q")  # Connection.send_bytes's framing


def frame(message: bytes) -> bytes:
    """``message`` as ``Connection.send_bytes`` frames it (for messages under 2 GiB)."""
    return _LENGTH.pack(len(message)) + message


class FrameReader:
    """The whole messages of a pipe, as many per read as it holds. A blocking descriptor makes
    ``read`` wait for the next bytes; a non-blocking one answers at once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._partial = b""  # the start of a message the next read completes
        self._ended = False

    def read(self) -> tuple[list[memoryview], bool]:
        """The messages the read completed (maybe none), and whether the pipe ended: its writer
        closed it or died (a message it left cut short is dropped), it would not read, or what
        it holds is not framed (the messages before that are returned). Once ended, it stays so."""
        if self._ended:
            return [], True
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:  # a spurious wake-up: nothing to read yet
            return [], False
        except OSError:
            data = b""
        if not data:
            self._ended = True
            return [], True
        if self._partial:
            data = self._partial + data
        messages, offset = _split(data)
        self._ended = offset < 0
        self._partial = b"" if self._ended else data[offset:]
        return messages, self._ended


def _split(data: bytes) -> tuple[list[memoryview], int]:
    """The whole messages at the start of ``data``, and where the rest begins (-1: ``data`` is not
    framed from there on)."""
    messages: list[memoryview] = []
    view = memoryview(data)
    offset, size = 0, len(data)
    while size - offset >= _LENGTH.size:
        (length,) = _LENGTH.unpack_from(data, offset)
        start = offset + _LENGTH.size
        if length == -1:
            if size - start < _LONG_LENGTH.size:
                break
            (length,) = _LONG_LENGTH.unpack_from(data, start)
            start += _LONG_LENGTH.size
        elif length < 0:  # not a length
            return messages, -1
        if size - start < length:
            break
        messages.append(view[start : start + length])
        offset = start + length
    return messages, offset
