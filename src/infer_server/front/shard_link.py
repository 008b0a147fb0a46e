"""The link between the main process of a server of several shards (``--shards``) and each shard.

A socket pair the shard inherits (``front.shards``). The main process writes the shard's settings
first (one JSON line), the shard answers ``ready`` once it serves; from then on the main process
asks and the shard answers, one JSON object per line, each answer carrying its question's ``id``
(answers may come in any order: a model change takes seconds, a scrape must not wait for it):

- ``{"models": ModelState}``: move the workers there (``ModelControl.follow``); answered ``{}``,
  ``{"incomplete": why}`` or ``{"refused": why}``;
- ``{"metrics": null}``: the shard's metric families, for the main process's scrape to merge;
- ``{"shadow": null}``: what the shard's shadow runs found (``ListModels`` sums every shard's);
- ``{"drift": null}``: the shard's drift window (``DriftMonitor.export``), which the main
  process judges with its own.

Unasked, the shard says ``{"health": true|false}`` (no id) once it serves and whenever its health
changes: a shard whose worker died makes the server NOT_SERVING, as a worker of the main process
does.

The link's end tells either side that the other is gone: a shard drains, the main process starts
the shard again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infer_server.front.choices import ModelState
from infer_server.supervisor.rollout import ReloadIncomplete, ReloadRefused

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer

log = logging.getLogger(__name__)


# A line of the link (an answer carries a shard's metric families: ~0.5 KB per model version seen).
LINE_LIMIT = 64 << 20


class ShardGone(ConnectionError):
    """The shard's end of the link closed (it exited, or is exiting)."""


class ShardLink:
    """The main process's end of one shard's link, once the shard serves: questions, answered in
    any order."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_health: Callable[[bool], None]
    ) -> None:
        self._reader, self._writer, self._on_health = reader, writer, on_health
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._closed = False
        self._reading = asyncio.ensure_future(self._read())

    async def ask(self, question: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The shard's answer to ``question``; ``ShardGone``, or ``TimeoutError`` past ``timeout``."""
        if self._closed:
            raise ShardGone("the shard is gone")
        number = next(self._ids)
        answer = self._pending[number] = asyncio.get_running_loop().create_future()
        try:
            self._writer.write(json.dumps({"id": number, **question}).encode() + b"\n")
            return await asyncio.wait_for(answer, timeout)
        finally:
            self._pending.pop(number, None)

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                answer = json.loads(line)
                if "id" not in answer:  # news: the shard's health changed
                    self._on_health(bool(answer["health"]))
                    continue
                waiting = self._pending.get(answer.pop("id", None))
                if waiting is not None and not waiting.done():
                    waiting.set_result(answer)
        except asyncio.CancelledError:
            raise  # close()
        except Exception as exc:  # noqa: BLE001 - a line that is no answer: the link cannot be trusted
            log.error("a shard's link broke (%r): closing it, so that the shard drains and is started again", exc)
            self._writer.close()
        finally:
            if not self._closed:  # it ended by itself: the shard no longer serves (it drains, or is gone)
                self._on_health(False)
            self._closed = True
            for waiting in self._pending.values():
                if not waiting.done():
                    waiting.set_exception(ShardGone("the shard is gone"))

    def close(self) -> None:
        self._closed = True
        self._writer.close()
        self._reading.cancel()


async def answer_main(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: InferenceServer) -> None:
    """A shard's end of its link, once it serves: answer each question (a task each), and say
    ``{"health": serving}`` now and whenever its health changes (a worker died, or every one is
    back), so that the server's health counts the shard's workers; returns when the link ends (the
    main process is gone)."""

    def say(serving: bool) -> None:
        writer.write(json.dumps({"health": serving}).encode() + b"\n")

    server.on_status = say
    say(server.accepting and server.pool is not None and server.pool.healthy)
    answering: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        try:
            question = json.loads(line)
        except ValueError:
            log.error("a malformed question from the main process: %r", line[:200])
            continue
        task = asyncio.ensure_future(_answer(question, writer, server))
        answering.add(task)
        task.add_done_callback(answering.discard)
    for task in answering:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*answering, return_exceptions=True)


async def _answer(question: dict[str, Any], writer: asyncio.StreamWriter, server: InferenceServer) -> None:
    """Every question gets an answer, whatever goes wrong: the main process waits for it."""
    answer: dict[str, Any] = {"id": question.get("id")}
    try:
        if "models" in question:
            try:
                await server.control.follow(ModelState.from_json(question["models"]))
            except ReloadIncomplete as exc:
                answer["incomplete"] = f"{exc}; it serves the old models until its chunks are done"
        elif "metrics" in question:
            answer["families"] = server.metrics.export()
        elif "drift" in question:
            answer["drift"] = server.drift.export()
        elif "shadow" in question:
            control = server.control
            answer["shadow"] = {"agreement": vars(control.agreement), "skipped": control.shadow_skipped}
    except Exception as exc:  # noqa: BLE001 - ReloadRefused, or anything else: said, not swallowed
        if not isinstance(exc, ReloadRefused):
            log.exception("the main process's question %.200r failed", question)
        answer["refused"] = str(exc) or repr(exc)
    writer.write(json.dumps(answer).encode() + b"\n")
