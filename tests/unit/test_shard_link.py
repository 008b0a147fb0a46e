"""The main process's end of a shard's link (``front.shard_link.ShardLink``) against a scripted
shard on a socket pair: answers by id, news of its health, and lines that are no answer."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from infer_server.front.shard_link import ShardGone, ShardLink
from infer_server.front.shards import ShardProcesses
from infer_server.settings import ServerSettings

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _linked(script: Script, health: list[bool]) -> tuple[ShardLink, asyncio.Task[None]]:
    ours, theirs = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=ours)
    shard = asyncio.ensure_future(script(*await asyncio.open_unix_connection(sock=theirs)))
    return ShardLink(reader, writer, health.append), shard


async def _answering(answers: dict[str, dict[str, object]], reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:  # fmt: skip
    """A shard that says it serves, then answers each question with ``answers[its key]``."""
    writer.write(b'{"health": true}\n')
    while line := await reader.readline():
        question = json.loads(line)
        key = next(k for k in question if k != "id")
        writer.write(json.dumps({"id": question["id"], **answers[key]}).encode() + b"\n")
    writer.close()


def test_a_refused_question_is_no_answer_and_a_scrape_keeps_the_last_one(tmp_path: Path) -> None:
    """A shard that refuses a scrape (its export failed) must not take its counts out of the sum;
    its gauges then say nothing (what it had in flight at its last answer is not in flight now)."""

    async def run() -> None:
        health: list[bool] = []
        counter = ["infer_batches", "counter", "", [["infer_batches_total", {}, 3.0]]]
        families = [counter, ["infer_inflight_images", "gauge", "", [["infer_inflight_images", {}, 8.0]]]]
        answers: dict[str, dict[str, object]] = {"metrics": {"families": families}}
        link, shard = await _linked(lambda r, w: _answering(answers, r, w), health)
        shards = ShardProcesses(ServerSettings(local_socket=tmp_path / "s", shards=2, workers=2), lambda: None)
        shards._links[1] = link
        assert await shards._scrape() == families
        answers["metrics"] = {"refused": "the export failed"}
        assert await shards._everyone("metrics", "families") == {}  # no KeyError
        assert await shards._scrape() == [counter], "its last counts count, its last gauges do not"
        answers["metrics"] = {"families": families}
        assert await shards._scrape() == families
        assert health == [True]
        link.close()
        shard.cancel()

    asyncio.run(run())


def test_a_line_that_is_no_answer_closes_the_link_and_the_shard_no_longer_serves() -> None:
    async def run() -> None:
        health: list[bool] = []
        ended = asyncio.Event()

        async def garbled(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b'{"health": true}\n[1, 2]\n')
            assert await reader.read() == b""  # the main process closed the link: the shard drains
            ended.set()

        link, _ = await _linked(garbled, health)
        await asyncio.wait_for(ended.wait(), 10)
        assert health == [True, False]
        try:
            await link.ask({"metrics": None}, 1.0)
        except ShardGone:
            return
        raise AssertionError("asked a link that broke")

    asyncio.run(run())
