"""A worker's inbox (``supervisor.channels.Inbox``): what it writes is what the worker's
``recv_bytes`` reads; once closed it refuses to write, even where its descriptor number is reused;
what it holds back (``WriteCoalescer``: on the loop, to the end of its turn) goes in order, in one
write, and never after a write from another thread."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os

import pytest

from infer_server.messages import FileRef, ImageRef, WorkItem, loads
from infer_server.pipes import FrameReader
from infer_server.supervisor.channels import Inbox, LoopHandoff, WriteCoalescer


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


def readable(reader: multiprocessing.connection.Connection) -> bool:
    return reader.poll(0)


def test_held_items_go_in_one_write_in_order_and_the_stop_marker_is_never_held() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    inbox = Inbox(writer, batch_size=8, hold=lambda _inbox: True)
    sent = [item(n, ("a", "b")) for n in range(1, 4)]
    for one in sent:
        inbox.put(one)
    assert not readable(reader), "held until flushed"
    inbox.flush()
    assert [loads(reader.recv_bytes()) for _ in sent] == sent
    inbox.put(item(4, ("c",)))
    inbox.put(None)  # written at once, after what was held before it
    assert [loads(reader.recv_bytes()) for _ in range(2)] == [item(4, ("c",)), None]
    inbox.close()
    reader.close()


def test_a_closed_inbox_drops_what_it_held_and_flushing_it_fails() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    inbox = Inbox(writer, hold=lambda _inbox: True)
    inbox.put(item(1, ("a",)))
    inbox.close()
    with pytest.raises(OSError):
        inbox.put(None)
    assert os.read(reader.fileno(), 100) == b"", "nothing came before the end"
    reader.close()


def test_on_the_loop_a_turns_items_go_at_its_end_and_another_threads_at_once() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    os.set_blocking(reader.fileno(), False)

    async def main() -> None:
        coalescer = WriteCoalescer(LoopHandoff(asyncio.get_running_loop(), lambda outcomes: None))
        inbox = Inbox(writer, batch_size=8, hold=coalescer.hold)
        for n in (1, 2):
            inbox.put(item(n, ("a",)))
        with pytest.raises(BlockingIOError):
            os.read(reader.fileno(), 1)  # nothing before the turn ends
        await asyncio.sleep(0)
        frames, ended = FrameReader(reader.fileno()).read()  # both, from one read
        assert ([loads(f) for f in frames], ended) == ([item(1, ("a",)), item(2, ("a",))], False)
        inbox.put(item(3, ("a",)))
        await asyncio.to_thread(inbox.put, item(4, ("a",)))  # another thread: written at once, 3 with it
        frames, _ = FrameReader(reader.fileno()).read()
        assert [loads(f).item_id for f in frames] == [3, 4]
        await asyncio.sleep(0)  # the turn's flush finds nothing left
        with pytest.raises(BlockingIOError):
            os.read(reader.fileno(), 1)
        inbox.close()

    asyncio.run(main())
    reader.close()
