"""A worker's inbox (``supervisor.channels.Inbox``): what it writes is what the worker's
``recv_bytes`` reads; once closed it refuses to write, even where its descriptor number is reused."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from infer_server.messages import FileRef, ImageRef, WorkItem, loads
from infer_server.supervisor.channels import Inbox


def item(item_id: int, names: tuple[str, ...]) -> WorkItem:
    refs = tuple(ImageRef(i, 10 * i, 10, name) for i, name in enumerate(names))
    return WorkItem(item_id, "b" * 32, FileRef("/dev/shm/x", 1, 2, 10 * len(refs), 7), refs, 123.5)


def test_items_arrive_whole_and_in_order() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    inbox = Inbox(writer, batch_size=8)
    sent = [item(n, tuple(f"image-{n}-{i}" for i in range(8))) for n in range(1, 6)]
    for one in sent:
        assert inbox.put(one) is False  # small enough to keep its names
    inbox.put(None)
    assert [loads(reader.recv_bytes()) for _ in sent] == sent
    assert loads(reader.recv_bytes()) is None
    inbox.close()
    reader.close()


def test_an_item_too_large_for_its_share_goes_without_names() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    inbox = Inbox(writer, batch_size=8)
    long = item(1, tuple("n" * (inbox.limit // 4) for _ in range(8)))
    assert inbox.put(long) is True
    got = loads(reader.recv_bytes())
    assert [ref.name for ref in got.images] == [""] * 8
    assert [(r.index, r.offset, r.size) for r in got.images] == [(r.index, r.offset, r.size) for r in long.images]
    inbox.close()
    reader.close()


def test_a_closed_inbox_never_writes_to_its_old_descriptor_number() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    inbox = Inbox(writer)
    number = writer.fileno()
    other_read, other_write = os.pipe()  # before the close: numbers of their own
    inbox.close()
    reader.close()
    os.dup2(other_write, number)  # the number now writes into another pipe
    try:
        with pytest.raises(OSError):
            inbox.put(item(1, ("a",)))
        os.set_blocking(other_read, False)
        with pytest.raises(BlockingIOError):
            os.read(other_read, 1)
    finally:
        for fd in (other_read, other_write, number):
            os.close(fd)
