"""Shards (``--shards K``): the server as K data planes, one process each, on one host.

One main process is one chain of work per push (client → main → worker → main → client) with the
one-threaded main process in it twice; on a small host the scheduler leaves a core idle while the
chain waits on it (docs/front-scaling.md, "Shards"). K shards are K such chains side by side. Each
is a whole server minus what only one process may hold: its own admission and batch registry, its
own workers (``--workers`` split over the shards, one at least each), its own staging directory and result cache,
and its own local socket, ``<local-socket>`` for shard 0 and ``<local-socket>.k`` for shard k.
The budgets (images and bytes in flight, per caller and per server, batches retained, the cache)
are divided among them: K shards never hold more than one server would, except that a shard's
in-flight images and bytes (its own and per caller) are at least one largest batch's
(``--max-batch-images``, ``--max-batch-bytes``), so that each can take any batch the server could.

Shard 0 is the main process: it alone serves gRPC (and its front processes), the metrics port and
health, and it supervises the others (``ShardProcesses``): it starts them (``python -m
infer_server.front.shards``, linked by a socket pair: ``front.shard_link``), waits until each
serves, starts one that exits again (health is NOT_SERVING until it serves), and stops them when
it drains. A shard whose main process goes away sees its link close and drains too. It alone
decides which models serve: a change (by call, or the repository poll) moves its own workers and
then each shard's in turn to the versions its workers loaded, and a shard started again is told
them before its first worker starts (``front.choices.ModelState``). A scrape of its metrics port
adds the other shards' metrics to its own; ``ListModels`` sums every shard's shadow runs.

Routing is the client library's (``infer_client.local``): the first Session reply on a local
socket says how many shards there are and which one the client should use; batch ids and request
ids name their shard (``infer_proto.shards``), and a shard refuses a push over the local socket
whose request id is another shard's, so that a client that does not route cannot push one request
twice. gRPC calls, which only this process serves, it routes itself: each push to its shard, each
pulled batch read on its shard, over a relay each shard inherits (``front.shard_relay``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infer_proto.shards import shard_socket
from infer_server.front.caller_usage import CallerUsage, caller_quotas
from infer_server.front.children import start_again, wait_or_kill
from infer_server.front.choices import ModelState
from infer_server.front.metrics import carried
from infer_server.front.shard_link import LINE_LIMIT, ShardGone, ShardLink
from infer_server.front.shard_relay import Relays, ToShard
from infer_server.messages import Agreement
from infer_server.settings import ServerSettings
from infer_server.supervisor.rollout import ReloadRefused

log = logging.getLogger(__name__)

_READY_TIMEOUT_MARGIN_S = 30.0  # beyond --startup-timeout-s, for the interpreter and gRPC to load
_RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0)  # between restarts of a shard that keeps dying
_ASK_TIMEOUT_S = 5.0  # for a shard's metrics or shadow counts (a shard that takes longer is left out)


def _share(total: int, shards: int, least: int = 1) -> int:
    """A shard's part of a budget: ``total // shards``, but never below ``least`` (what one batch
    may need, so that a shard can take the largest batch the whole server could) unless the total
    itself is."""
    return max(min(least, total), total // shards)


def shard_settings(settings: ServerSettings) -> ServerSettings:
    """The settings of shard ``settings.shard_index``: its workers, budgets, socket and directories."""
    k, index = settings.shards, settings.shard_index
    if k == 1:
        return settings
    s = settings
    assert s.local_socket is not None  # the settings' validation
    images, size = s.max_batch_images, s.max_batch_bytes  # what one batch may need
    per_caller = {  # the whole quota, over the caller's work on every shard (front.caller_usage)
        "max_inflight_images_per_identity": s.max_inflight_images_per_identity or s.max_inflight_images,
        "max_inflight_bytes_per_identity": s.max_inflight_bytes_per_identity or s.max_inflight_bytes,
    } if caller_quotas(s) else {}  # fmt: skip
    update: dict[str, object] = {
        "workers": max(1, s.workers // k + (1 if index < s.workers % k else 0)),  # each shard one at least
        "max_inflight_images": _share(s.max_inflight_images, k, images),
        "max_inflight_bytes": _share(s.max_inflight_bytes, k, size),
        "max_retained_batches": _share(s.max_retained_batches, k),
        "max_retained_batches_per_identity": _share(s.max_retained_batches_per_identity, k),
        "result_cache_entries": s.result_cache_entries // k if s.result_cache_entries else 0,
        "result_cache_mib": _share(s.result_cache_mib, k),
        **per_caller,
    }
    if index:  # what only the main process holds: gRPC, its sockets, the metrics port
        update |= {
            "local_socket": Path(shard_socket(s.local_socket, index)),
            "staging_dir": _beside(s.staging, index),
            "spill_dir": _beside(s.spill_dir, index) if s.spill_dir else None,
            "unix_socket": None,
            "fronts": 0,
            "metrics_port": None,
        }
    return s.model_copy(update=update)


def staging_dirs(settings: ServerSettings) -> list[Path]:
    """Every shard's staging directory (``settings`` are the whole server's)."""
    return [settings.staging, *(_beside(settings.staging, k) for k in range(1, settings.shards))]


def remove_leftovers(settings: ServerSettings) -> None:
    """Staging (and spill) directories of shards an earlier run had and this one has not
    (``<staging>.shard-k``, k ≥ K): what a shard staged there before a crash is other callers'
    bytes, and no shard of this run sweeps it. Only real directories of this user go, and none
    that a running shard holds (its ``flock``: a second server started by mistake on the same
    directories takes nothing from the first)."""
    for directory in (d for d in (settings.staging, settings.spill_dir) if d is not None):
        try:
            names = os.listdir(directory.parent)
        except OSError:
            continue
        for name in names:
            number = name.removeprefix(f"{directory.name}.shard-")
            if number != name and number.isdigit() and int(number) >= settings.shards:
                _remove_unheld(directory.parent / name)


def _remove_unheld(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return  # gone, or not a directory (a symlink is not followed)
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a shard serves from it
        shutil.rmtree(path)
        log.info("removed %s, the staging directory of a shard an earlier run had", path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _beside(directory: Path, index: int) -> Path:
    """A shard's own directory next to the main process's (never inside it: its sweeps stay its own)."""
    return directory.with_name(f"{directory.name}.shard-{index}")


class ShardProcesses:
    """Shards 1 … K−1 of the main process's server: started, kept running, stopped.

    Each is linked to this process by a socket pair it inherits (as front processes are): the
    settings go down it, ``ready`` comes back once the shard serves, and its end tells the shard
    that this process is gone. Nothing else is shared but, with per-caller quotas, the table of
    each caller's work (``front.caller_usage``): a shard's workers inherit none of them, so the
    shard's exit alone is what ``wait`` waits for."""

    def __init__(self, settings: ServerSettings, on_change: Callable[[], None]) -> None:
        self._settings, self._on_change = settings, on_change
        self._processes: dict[int, asyncio.subprocess.Process] = {}
        self._links: dict[int, ShardLink] = {}
        self.relays = Relays(settings.shards)  # the gRPC calls handed to each shard (front.shard_relay)
        self.models: ModelState | None = None  # what every shard serves, once a change was made
        self._models_lock = asyncio.Lock()  # a change, or a shard being started again with the models
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pools: dict[int, bool] = {}  # what each running shard last said of its health
        self._scraped: dict[int, list[list[Any]]] = {}  # each shard's metric families as last scraped
        self._carried: dict[int, list[list[Any]]] = {}  # what its runs before the last start counted
        self._watchers: dict[int, asyncio.Task[None]] = {}
        self._stopping = False
        # Each caller's work on every shard, when per-caller quotas are set: this process's view.
        self.caller_usage = CallerUsage.create(settings.shards) if caller_quotas(settings) else None

    @property
    def serving(self) -> bool:
        """Every shard runs (one being started again is missing) and says it serves (every one of
        its workers is ready)."""
        return len(self._processes) == self._settings.shards - 1 and all(self._pools.values())

    def _health(self, index: int, serving: bool) -> None:
        """Shard ``index`` says whether it serves (``front.shard_link``)."""
        if self._pools.get(index) != serving:
            self._pools[index] = serving
            self._on_change()

    async def start(self) -> None:
        """Start every shard and wait until each serves; one that does not fails the start (and
        stops those that did)."""
        self._loop = asyncio.get_running_loop()
        indices = range(1, self._settings.shards)
        started = await asyncio.gather(*(self._start_one(k) for k in indices), return_exceptions=True)
        for index, process in zip(indices, started, strict=True):
            if not isinstance(process, BaseException):
                self._serving(index, *process)
        if failed := [error for error in started if isinstance(error, BaseException)]:
            await self.stop()
            raise failed[0]

    async def _start_one(self, index: int) -> tuple[asyncio.subprocess.Process, ShardLink, ToShard]:
        settings = self._settings.model_copy(update={"shard_index": index}).model_dump(mode="json")
        models = None if self.models is None else self.models.to_json()
        config = json.dumps({"settings": settings, "models": models}).encode()
        (ours, theirs), (relay_ours, relay_theirs) = socket.socketpair(), socket.socketpair()
        relay = ToShard(index)
        with ours, theirs, relay_ours, relay_theirs:
            fds: tuple[int, ...] = (theirs.fileno(), relay_theirs.fileno())
            if self.caller_usage is not None:
                self.caller_usage.clear(index)  # what an earlier run of this shard had in flight went with it
                fds += (self.caller_usage.fd,)
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "infer_server.front.shards", *map(str, fds), pass_fds=fds
            )
            reader, link = await asyncio.open_unix_connection(sock=ours.dup(), limit=LINE_LIMIT)
            await relay.connect(relay_ours.dup())
        try:
            link.write(config + b"\n")
            bound = self._settings.startup_timeout_s + _READY_TIMEOUT_MARGIN_S
            try:
                said = await asyncio.wait_for(reader.readline(), bound)
            except TimeoutError:
                raise RuntimeError(f"shard {index} did not start within {bound:g} s") from None
            if said != b"ready\n":  # b"": it is exiting (its end of the link closes with it)
                code = await asyncio.wait_for(process.wait(), _READY_TIMEOUT_MARGIN_S)
                raise RuntimeError(f"shard {index} did not start (exit status {code})")
        except BaseException:
            link.close()
            relay.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        log.info("shard %d (pid %d) serves %s", index, process.pid,
                 shard_socket(self._settings.local_socket or "", index))  # fmt: skip
        return process, ShardLink(reader, link, lambda serving: self._health(index, serving)), relay

    def _serving(self, index: int, process: asyncio.subprocess.Process, link: ShardLink, relay: ToShard) -> None:
        self._processes[index], self._links[index], self.relays[index] = process, link, relay
        self._watchers[index] = asyncio.ensure_future(self._watch(index, process))
        self._on_change()

    async def _watch(self, index: int, process: asyncio.subprocess.Process) -> None:
        """Wait for the shard to exit; unless the server stops, start it again (backing off)."""
        code = await process.wait()
        if self._stopping:
            return
        del self._processes[index]
        self._links.pop(index).close()
        self.relays.pop(index).close()
        self._pools.pop(index, None)
        self._carried[index] = carried([*self._carried.get(index, []), *self._scraped.pop(index, [])])
        self._on_change()
        log.warning("shard %d (pid %d) exited with %s: starting it again", index, process.pid, code)
        await start_again(lambda: self._start_again(index), _RESTART_DELAYS_S, lambda: self._stopping,
                          f"shard {index}")  # fmt: skip

    async def _start_again(self, index: int) -> None:
        """Start shard ``index`` again with the models every other shard serves (no change is made
        meanwhile: it waits, and then reaches this shard too)."""
        async with self._models_lock:
            started, link, relay = await self._start_one(index)
            if self._stopping:  # the stop came as it started: stop() no longer sees it
                started.kill()
                link.close()
                relay.close()
                await started.wait()
                return
            self._serving(index, started, link, relay)

    async def follow(self, state: ModelState, previous: ModelState) -> list[str]:
        """Every shard, one after another, moves from ``previous`` to ``state`` (the main process's
        workers moved first): why the change is not complete yet in some, if so. ``ReloadRefused``
        if one refused: those that moved go back to ``previous``, and the refusal names the shard.
        A shard that exits meanwhile is started again with what the change ends in."""
        async with self._models_lock:
            moved: list[int] = []
            incomplete: list[str] = []
            for index in sorted(self._processes):
                try:
                    if said := await self._ask(index, state):
                        incomplete.append(f"shard {index}: {said}")
                except ReloadRefused as exc:
                    for done in moved:
                        try:
                            await self._ask(done, previous)
                        except ReloadRefused as again:
                            log.error("shard %d could not go back to the models before the change: %s", done, again)
                    raise ReloadRefused(f"shard {index}: {exc}") from None
                moved.append(index)
            self.models = state
            return incomplete

    async def _ask(self, index: int, state: ModelState) -> str:
        """Shard ``index`` moves to ``state``: '' or why it is incomplete; ``ReloadRefused`` with its
        reason. A shard that exits, or does not answer in time (it is killed), is started again."""
        bound = 2 * self._settings.reload_timeout_s + _READY_TIMEOUT_MARGIN_S
        try:
            answer = await self._links[index].ask({"models": state.to_json()}, bound)
        except TimeoutError:
            log.error("shard %d did not answer a model change within %g s: killing it", index, bound)
            with contextlib.suppress(ProcessLookupError, KeyError):
                self._processes[index].kill()
            return ""
        except (ShardGone, KeyError):
            return ""  # it exited since the change began: it is started again with the change's models
        if "refused" in answer:
            raise ReloadRefused(str(answer["refused"]))
        return str(answer.get("incomplete", ""))

    async def _everyone(self, question: str, key: str) -> dict[int, Any]:
        """Every serving shard's answer to ``question`` (its ``key``), by shard. None from a shard
        being started again, one that did not answer in time or refused (``{"refused": why}``), or
        one that exited while the others were asked (an answer of its last run is no longer its)."""
        links = list(self._links.items())
        answers = await asyncio.gather(*(link.ask({question: None}, _ASK_TIMEOUT_S) for _, link in links),
                                       return_exceptions=True)  # fmt: skip
        return {
            index: answer[key]
            for (index, link), answer in zip(links, answers, strict=True)
            if isinstance(answer, dict) and key in answer and self._links.get(index) is link
        }

    async def shadow(self) -> tuple[Agreement, int]:
        """What every shard's shadow runs found: their agreement and the runs skipped, summed."""
        agreement, skipped = Agreement(), 0
        for answer in (await self._everyone("shadow", "shadow")).values():
            agreement.add(Agreement(**answer["agreement"]))
            skipped += int(answer["skipped"])
        return agreement, skipped

    async def drift(self) -> list[dict[str, Any]]:
        """Every serving shard's drift window (``DriftMonitor.export``)."""
        return list((await self._everyone("drift", "drift")).values())

    def families(self) -> list[list[Any]]:
        """Every other shard's metric families (``ServerMetrics.export``), for a scrape: called
        from the metrics server's thread, never the loop. So that a counter never goes down, a
        shard that does not answer counts with its last answer's counts (not its gauges), and one
        started again with what its earlier runs had counted (``carried``)."""
        if self._loop is None:
            return []
        return asyncio.run_coroutine_threadsafe(self._scrape(), self._loop).result(_ASK_TIMEOUT_S + 1.0)

    async def _scrape(self) -> list[list[Any]]:
        answered = await self._everyone("metrics", "families")
        self._scraped |= answered
        # One that did not answer: its last counts, not its last gauges (what was in flight then is not now).
        parts = [families if k in answered else carried(families) for k, families in self._scraped.items()]
        return [family for families in (*parts, *self._carried.values()) for family in families]

    async def stop(self) -> None:
        """Every shard drains (as this process does: SIGTERM) and exits; one that does not is killed."""
        self._stopping = True
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)  # a shard half-started again is killed
        s = self._settings
        bound = s.drain_timeout_s + s.stop_grace_s + 15.0
        processes = dict(self._processes)
        for process in processes.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        for index, process in processes.items():
            await wait_or_kill(process, bound, f"shard {index}")
        for link in self._links.values():
            link.close()
        for relay in self.relays.values():
            relay.close()
        self._processes.clear()
        self._links.clear()
        self.relays.clear()


def main() -> None:
    """A shard's process: its link to the main process is the descriptor named by its first
    argument, the main process's gRPC relay the second (``front.shard_relay``), the callers' work
    a third (``front.caller_usage``, with per-caller quotas); its settings (and the models to
    serve, if a change was made first) come first on the link, as one JSON line. Served until
    SIGTERM/SIGINT or the link ends."""
    from infer_server.cli import serve_shard

    link, relay = socket.socket(fileno=int(sys.argv[1])), socket.socket(fileno=int(sys.argv[2]))
    usage = int(sys.argv[3]) if len(sys.argv) > 3 else None  # front.caller_usage's table, with per-caller quotas
    config = bytearray()
    while not config.endswith(b"\n"):
        if not (chunk := link.recv(65536)):
            sys.exit(1)  # the main process went away before it said what to serve
        config += chunk
    start = json.loads(config)
    models = None if start["models"] is None else ModelState.from_json(start["models"])
    serve_shard(ServerSettings.model_validate(start["settings"]), link, models, relay, usage)


if __name__ == "__main__":
    main()
