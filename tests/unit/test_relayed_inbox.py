"""A relayed call's request inbox (``front.relayed.Inbox``): in order, a waiting reader woken by the
next message, a reader cancelled while waiting takes nothing."""

from __future__ import annotations

import asyncio

import pytest

from infer_server.front.relayed import Inbox


def test_messages_come_out_in_order_and_a_waiting_reader_gets_the_next_one() -> None:
    async def main() -> None:
        inbox = Inbox(asyncio.get_running_loop())
        inbox.put(b"a")
        inbox.put(b"b")
        assert [await inbox.get(), await inbox.get()] == [b"a", b"b"]
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing there: it waits
        inbox.put(None)  # the client's end is a message too
        assert await asyncio.wait_for(reader, 5) is None

    asyncio.run(main())


def test_a_reader_cancelled_while_waiting_takes_nothing() -> None:
    async def main() -> None:
        inbox = Inbox(asyncio.get_running_loop())
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        inbox.put(b"kept")
        assert await inbox.get() == b"kept"

    asyncio.run(main())
