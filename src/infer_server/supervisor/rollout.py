"""Model changes while the pool serves: every worker moves to new ``WorkerOptions`` (other model
versions, a model left out) one at a time, and nothing in flight is lost or fails.

Runs in the server process, in a thread of the front's control call (blocking; never on the loop),
on the pool's own state under its lock (``PipelinePool._cond``). One change at a time
(``PipelinePool.reload_lock``). The steps, like a Kubernetes rolling update with one surge:

1. **Candidate.** An extra worker (slot ``num_workers``) starts with the new options. If it fails
   to load them (a corrupt ONNX file, a config that does not parse, a label set the attribute
   models' ``applies_to`` does not fit, a version not on disk) the change is refused with the
   worker's own reason and the serving workers never noticed. If it loads, it starts taking chunks
   at once, and from now on the pool's restarts use the new options.
2. **One by one.** Each old worker is marked *retiring*: it is handed no more chunks, finishes the
   ones it holds (in-flight chunks finish on the version they started with) and stops on the
   marker that follows them. Its slot is refilled at once with the new options, and the next old
   worker goes only when that replacement is READY. The extra worker stands in for the one being
   replaced, so as many workers serve as before and health stays SERVING.
   Should the extra worker die meanwhile, it is restarted like any other.
3. **Done.** The extra worker retires the same way and its slot goes, also when a step overran the
   change's timeout (``ReloadIncomplete``: the change is made, an old worker is slow to go).

Chunks waiting in the ledger go to whichever worker takes them first; every result names the
model versions that produced it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from infer_server.messages import STOP, WorkerOptions
from infer_server.supervisor.processes import MAX_WAIT, WorkerProcess

if TYPE_CHECKING:
    from infer_server.supervisor.pool import PipelinePool


class ReloadRefused(RuntimeError):
    """The new models did not load; the serving ones serve on, unchanged."""


class ReloadIncomplete(RuntimeError):
    """The new models loaded and restarts load them, but a worker did not move in time (it still
    serves the old ones until it finishes its chunks and stops)."""


def roll(pool: PipelinePool, options: WorkerOptions, timeout: float) -> tuple[tuple[str, str], ...]:
    """Move every worker of ``pool`` to ``options``; the models now served. ``ReloadRefused`` if
    the candidate does not load (nothing changed), ``ReloadIncomplete`` if an old worker did not
    make way within ``timeout`` (the change is made: restarts use the new options)."""
    if not pool.reload_lock.acquire(blocking=False):
        raise ReloadRefused("another model change is under way; retry when it is done")
    try:
        return _roll(pool, options, time.monotonic() + timeout)
    finally:
        pool.reload_lock.release()


def _roll(pool: PipelinePool, options: WorkerOptions, deadline: float) -> tuple[tuple[str, str], ...]:
    with pool._cond:
        before = {id(w) for w in pool._slots if w is not None}
    candidate = _candidate(pool, options, deadline)
    # Every replacement loads exactly what the candidate loaded, whatever lands on disk meanwhile.
    options = dataclasses.replace(options, pins=tuple(sorted({**dict(options.pins), **dict(candidate.models)}.items())))
    with pool._cond:
        pool._options = options
        assert candidate.report is not None
        pool.models, pool.report = candidate.models, candidate.report
        pool.standing_in.add(candidate.slot)  # restarted, should it die while it stands in
    try:
        for slot in range(pool.num_workers):
            with pool._cond:
                old = pool._slots[slot]
            if old is None or (id(old) not in before and old.options == options):
                continue  # dead (its restart uses the new options), or started since with them
            _retire(pool, old)
            _wait(pool, _ready_in(pool, slot, old), deadline, f"worker {slot} did not come back")
    except TimeoutError as exc:
        raise ReloadIncomplete(str(exc)) from None
    finally:
        _stand_down(pool, candidate.slot)
    return pool.models


def _stand_down(pool: PipelinePool, slot: int) -> None:
    """The extra slot goes: whoever holds it now (the candidate or its restart) finishes the chunks
    it holds and stops; nothing restarts it."""
    with pool._cond:
        pool.standing_in.discard(slot)
        pool._restart_at.pop(slot, None)
        worker = pool._slots[slot] if slot < len(pool._slots) else None
    if worker is not None:
        _retire(pool, worker)
        with contextlib.suppress(TimeoutError, ReloadRefused):  # it goes when its chunks are done
            _wait(pool, lambda: worker not in pool._slots, time.monotonic() + MAX_WAIT, "")


def _candidate(pool: PipelinePool, options: WorkerOptions, deadline: float) -> WorkerProcess:
    """Start the extra worker and wait for its verdict on ``options``."""
    worker = pool._spawn(-1, options)
    if worker is None:
        raise ReloadRefused("the server is stopping")

    def verdict() -> bool:
        return worker.ready or worker.setup_error is not None or not worker.process.is_alive()

    try:
        _wait(pool, verdict, deadline, "the new models did not load in time")
    except TimeoutError as exc:
        _drop(pool, worker)
        raise ReloadRefused(str(exc)) from None
    if not worker.ready:
        _drop(pool, worker)
        why = worker.setup_error or f"the worker exited with code {worker.process.exitcode} while loading"
        raise ReloadRefused(why.split(": ", 1)[-1] if worker.setup_error else why)
    return worker


def _retire(pool: PipelinePool, worker: WorkerProcess, kill: bool = False) -> None:
    """No more chunks for ``worker``; it stops after those it holds (its death refills its slot,
    or drops the extra one: ``PipelinePool._on_death``)."""
    with pool._cond:
        worker.retiring = True
        with contextlib.suppress(OSError):  # already gone: the watcher has seen or will see its death
            worker.inbox.put(STOP)
    if kill and worker.process.is_alive():
        worker.process.kill()


def _drop(pool: PipelinePool, worker: WorkerProcess) -> None:
    """A candidate that failed: kill it and wait (briefly) until its slot is gone."""
    _retire(pool, worker, kill=True)
    with contextlib.suppress(TimeoutError, ReloadRefused):
        _wait(pool, lambda: worker not in pool._slots, time.monotonic() + MAX_WAIT, "")


def _ready_in(pool: PipelinePool, slot: int, old: WorkerProcess) -> Callable[[], bool]:
    """Slot ``slot`` holds a READY worker other than ``old``."""

    def done() -> bool:
        worker = pool._slots[slot]
        return worker is not None and worker is not old and worker.ready

    return done


def _wait(pool: PipelinePool, done: Callable[[], bool], deadline: float, what: str) -> None:
    """Wait under the pool's lock until ``done()``; ``TimeoutError(what)`` at ``deadline``."""
    with pool._cond:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(what)
            if pool._stopping:
                raise ReloadRefused("the server is stopping")
            pool._cond.wait(min(MAX_WAIT, left))
