"""The event loop the server's processes run on (``--event-loop``): uvloop by default, asyncio's own
on request.

The main process, each shard and each gRPC front process run every push through their loop
several times: the socket's read, the admission task, the worker pipe's read, the reply's write
and its acknowledgement. asyncio's own loop does that bookkeeping in Python (``_run_once``,
the selector, the handles, the transports' reads and writes); uvloop does it in C on libuv, with
the same ``asyncio`` API, so nothing else changes. Counted by ``benchmarks.instructions`` it takes
5-12% off the main process's instructions per push (docs/performance.md, "The event loop");
asyncio's loop stays selectable, for a platform without uvloop's wheel or a suspected loop bug.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

EventLoop = Literal["uvloop", "asyncio"]
EVENT_LOOPS: tuple[EventLoop, ...] = ("uvloop", "asyncio")

_T = TypeVar("_T")


def loop_factory(kind: EventLoop) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes a loop of ``kind`` (None: asyncio's default)."""
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def run(main: Coroutine[Any, Any, _T], kind: EventLoop) -> _T:
    """``asyncio.run(main)`` on a new loop of ``kind``."""
    with asyncio.Runner(loop_factory=loop_factory(kind)) as runner:
        return runner.run(main)


def running_kind() -> EventLoop:
    """The kind of the loop running in this thread (the server logs it at start)."""
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
