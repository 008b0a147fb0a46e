"""The front's background consistency task: keeps the staging tiers, their accounting and the
result cache true to what is on disk and in the workers, whatever requests did or a crash left.

One asyncio task in the server's main process (``front.server`` starts it with the pool), every
``--upkeep-interval-s`` (1 s):

- **Demotion.** While the staging directory's file system (the shared tmpfs by default) is over
  ``--spill-at`` and a ``--spill-dir`` is set, the coldest staged batches (the newest: the pool
  serves first come, first served, so they are read last) are copied to the disk tier in the kernel
  and swapped in for the tmpfs copy, which is deleted: the memory comes back at once. Only a batch
  none of whose chunks a worker holds is moved (``PipelinePool.refile``, under the pool's lock);
  workers read either tier through the front's descriptor, so they never notice.
- **Accounting.** The per-tier staged bytes are recounted from the batch files the front holds, so
  a metric never drifts from the truth.
- **Cache.** The result cache is keyed on the models the workers report now: entries of model
  versions no longer loaded are dropped (``InferenceServer.follow_models``).
- **Orphans.** Every ``--janitor-interval-s`` (60 s), staging files of either tier older than
  ``--janitor-ttl-s`` that no live batch uses are removed (a crashed run's leftovers; start-up
  clears both tiers before the first request, ``front.staging``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from infer_server.front.handoff import BatchFile, Handoff

if TYPE_CHECKING:
    from infer_server.front.batches import Batch
    from infer_server.front.server import InferenceServer

log = logging.getLogger(__name__)

# Batches moved to disk in one pass at most: a pass never holds the loop for long.
MAX_DEMOTIONS = 64


class Upkeep:
    """The consistency task of one ``InferenceServer``: ``await run()`` until cancelled."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        self.handoff: Handoff = server.handoff
        settings = server.settings
        self.interval_s = settings.upkeep_interval_s
        self.sweep_every_s, self.orphan_ttl_s = settings.janitor_interval_s, settings.janitor_ttl_s
        self._next_sweep = 0.0

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except OSError as exc:  # a tier gone bad: say so and keep the server up
                log.warning("staging upkeep failed: %s", exc)
            await asyncio.sleep(self.interval_s)

    async def once(self) -> None:
        """One pass: cache key, spares dropped or demotion while staging is over the mark, accounting,
        and (when due) the orphan sweep."""
        self.server.follow_models()
        staging = self.handoff.tiers[0]
        if staging.spares and staging.used() > self.handoff.spill_at:
            staging.drop_spares()  # the tmpfs is filling: the spares' pages go back first
        if self.handoff.over_mark():
            moved = await self.demote()
            if moved:
                log.info("moved %d staged batches to the spill directory (staging is over %.0f%%)",
                         moved, 100 * self.handoff.spill_at)  # fmt: skip
        old = self.handoff.recount()
        if old != self.handoff.staged_bytes:
            log.warning("staged bytes per tier were %s, are %s: corrected", old, self.handoff.staged_bytes)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + self.sweep_every_s
            keep = frozenset(self.server.registry.staged_paths())
            removed = await asyncio.to_thread(self.handoff.sweep, self.orphan_ttl_s, keep)
            if removed:
                log.info("removed %d orphaned staging files", removed)

    async def demote(self) -> int:
        """Move the coldest staged batches to the disk tier until staging is under its mark."""
        moved = 0
        for batch in self.server.registry.staged_batches(tier=0)[:MAX_DEMOTIONS]:
            old, pool = batch.file, self.server.pool
            if old is None or batch.finished_at is not None or not self.handoff.over_mark():
                continue
            if pool is None or not pool.refile(batch.batch_id, None):
                continue  # a worker holds a chunk of it: it is being read now, no use moving it
            try:
                new = await asyncio.to_thread(self.handoff.demote, old)
            except FileNotFoundError:
                continue  # it finished meanwhile
            except OSError as exc:
                log.warning("could not move a staged batch to the spill directory: %s", exc)
                return moved
            moved += self._swap(batch, old, new)
        return moved

    def _swap(self, batch: Batch, old: BatchFile, new: BatchFile) -> bool:
        """On the loop, so no answer of the batch comes in between: the pool reads ``new`` from now
        on if no worker holds a chunk of it, and the tmpfs copy goes; else the copy goes."""
        pool, live = self.server.pool, batch.file is old and batch.finished_at is None
        if live and pool is not None and pool.refile(batch.batch_id, new.file):
            batch.file = new
            self.handoff.demotions += 1
            self.handoff.release(old)  # a tmpfs unlink: cheap enough for the loop
            return True
        self.handoff.release(new)
        return False
