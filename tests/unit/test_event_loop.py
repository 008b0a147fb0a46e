"""``event_loop.run``: a coroutine on the loop of the kind asked for."""

from __future__ import annotations

import asyncio

import pytest

from infer_server import event_loop


@pytest.mark.parametrize("kind", event_loop.EVENT_LOOPS)
def test_run_uses_the_loop_asked_for(kind: event_loop.EventLoop) -> None:
    async def main() -> tuple[str, str]:
        await asyncio.sleep(0)
        return event_loop.running_kind(), type(asyncio.get_running_loop()).__module__

    running, module = event_loop.run(main(), kind)
    assert running == kind
    assert module.split(".")[0] == kind


def test_run_returns_the_result_and_raises_the_error() -> None:
    async def fails() -> None:
        raise ValueError("from the coroutine")

    for kind in event_loop.EVENT_LOOPS:
        with pytest.raises(ValueError, match="from the coroutine"):
            event_loop.run(fails(), kind)
