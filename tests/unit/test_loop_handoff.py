"""Calls from the pool's threads onto the loop (``supervisor.channels.LoopHandoff``): run at once on
the loop's thread while it runs, queued onto the loop from any other thread."""

from __future__ import annotations

import asyncio
import threading

from infer_server.supervisor.channels import LoopHandoff


def test_the_loops_thread_runs_a_call_at_once_and_another_thread_queues_it() -> None:
    seen: list[tuple[str, bool]] = []

    async def main() -> LoopHandoff:
        handoff = LoopHandoff(asyncio.get_running_loop(), lambda outcomes: None)
        for _ in range(2):  # the second answer comes from the thread's id alone
            assert handoff.on_loop()
            handoff.call(lambda: seen.append(("loop", handoff.on_loop())))
        elsewhere = threading.Thread(target=lambda: seen.append(("thread", handoff.on_loop())))
        elsewhere.start()
        elsewhere.join()
        queued = asyncio.Event()
        threading.Thread(target=handoff.call, args=(queued.set,)).start()
        await asyncio.wait_for(queued.wait(), 5)
        return handoff

    handoff = asyncio.run(main())
    assert seen == [("loop", True), ("loop", True), ("thread", False)]
    assert not handoff.on_loop()  # the same thread, its loop no longer running
