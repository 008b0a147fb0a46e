"""A worker's result pipe as the loop reads it: whole messages from whatever each read brings."""

from __future__ import annotations

import multiprocessing
import os
import struct

from infer_server.messages import ItemDone, dumps
from infer_server.supervisor.channels import ResultReader


def pipe() -> tuple[ResultReader, multiprocessing.connection.Connection]:
    reader, writer = multiprocessing.Pipe(duplex=False)
    return ResultReader(reader), writer


def test_every_message_the_pipe_holds_comes_from_one_read_in_order() -> None:
    reader, writer = pipe()
    sent = [ItemDone(0, n, ()) for n in range(50)] + [(ItemDone(1, 99, ()),), "x" * 40_000]  # within a pipe's 64 KiB
    for message in sent:
        writer.send_bytes(dumps(message))
    got, ended = reader.read()
    assert (got, ended) == (sent, False)
    assert reader.read() == ([], False)  # nothing more: the read would block, and does not


def test_a_message_split_across_reads_is_whole_once_its_last_byte_came() -> None:
    reader, writer = pipe()
    body = dumps("abcd")
    frame = struct.pack("!i", len(body)) + body
    fd = writer.fileno()
    os.write(fd, frame[:2])  # inside the length
    assert reader.read() == ([], False)
    os.write(fd, frame[2:7])  # inside the pickle
    assert reader.read() == ([], False)
    os.write(fd, frame[7:] + struct.pack("!i", len(dumps(5))) + dumps(5))
    assert reader.read() == (["abcd", 5], False)


def test_the_long_length_form_is_read_too() -> None:
    reader, writer = pipe()
    body = dumps({"k": 1})
    os.write(writer.fileno(), struct.pack("!i", -1) + struct.pack("!Q", len(body)) + body)
    assert reader.read() == ([{"k": 1}], False)


def test_the_end_of_the_pipe_ends_it_and_a_message_cut_short_by_a_death_is_dropped() -> None:
    reader, writer = pipe()
    writer.send_bytes(dumps("whole"))
    os.write(writer.fileno(), struct.pack("!i", 100) + b"cut")  # the worker died mid-write
    writer.close()
    assert reader.read() == (["whole"], False)
    assert reader.read() == ([], True)


def test_a_message_that_will_not_unpickle_ends_the_pipe_after_those_before_it() -> None:
    reader, writer = pipe()
    writer.send_bytes(dumps("first"))
    writer.send_bytes(b"\x80\x05garbage")
    writer.send_bytes(dumps("after"))
    assert reader.read() == (["first"], True)
