"""What the main process does alike for the processes it supervises (``--fronts`` front processes,
``--shards`` shards): start one that died again, backing off while it keeps dying, and stop one
within a bound, killing it past it."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def start_again(
    start: Callable[[], Awaitable[T]], delays: Sequence[float], stopping: Callable[[], bool], what: str
) -> tuple[T] | None:
    """``start()`` after each of ``delays`` (the last one repeated) until it succeeds: its result
    (in a tuple); None once ``stopping()`` says the server stops."""
    for delay in itertools.chain(delays, itertools.repeat(delays[-1])):
        await asyncio.sleep(delay)
        if stopping():
            return None
        try:
            return (await start(),)
        except (OSError, RuntimeError, TimeoutError) as exc:
            log.error("%s did not start again: %s", what, exc)
    return None  # the delays never end


async def wait_or_kill(process: asyncio.subprocess.Process, bound: float, what: str) -> None:
    """Wait up to ``bound`` seconds for ``process`` to exit; then kill it."""
    try:
        await asyncio.wait_for(process.wait(), bound)
    except TimeoutError:
        log.warning("%s (pid %d) did not stop: killing it", what, process.pid)
        process.kill()
        await process.wait()
