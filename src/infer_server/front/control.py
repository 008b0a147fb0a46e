"""Models that change while the server runs: the operator's choices and the ``ModelControlService``.

In the server's main process, on the loop. ``ModelControl`` keeps what operators chose, which version
each model is pinned to and which attribute models are unloaded, and turns every change into new
``WorkerOptions`` that the pool moves its workers to one at a time (``PipelinePool.reload``, in a
thread; ``supervisor.rollout`` says how nothing is lost). The workers are the judges of a
version: the front never opens a model (``tests/unit/test_boundaries.py``), it learns the repository
from what the workers report (``PipelinePool.report``, ``PipelinePool.models``).

Who may change models: ``--model-control explicit`` (the default) and a caller named in
``--control-callers``; every change leaves an audit line. ``--repository-poll-s`` reads the
repository again whenever its files change (names, sizes and times of every file under it).

On a server of several shards (``--shards``) the main process's ``ModelControl`` decides for all:
a change moves its own workers, then each shard's (``ShardProcesses.follow``) to the versions its
workers loaded; a shard that refuses puts every other back, so the call is refused as a whole.
A shard's own ``ModelControl`` only follows (``follow``), and does not poll the repository.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from infer_server.front import audit
from infer_server.front.choices import Choices, ModelState
from infer_server.front.errors import (
    Busy,
    Incomplete,
    InvalidBatch,
    PermissionDeniedError,
    Refused,
    Unavailable,
    UnknownModel,
)
from infer_server.front.identity import Identity
from infer_server.messages import ROUTE_CANARY, ROUTE_SHADOW, ROUTE_STABLE, Agreement, ShadowDone, WorkerOptions
from infer_server.supervisor.rollout import ReloadIncomplete, ReloadRefused

if TYPE_CHECKING:
    from infer_server.front.server import InferenceServer
    from infer_server.supervisor.pool import PipelinePool

log = logging.getLogger(__name__)

_VERSION = re.compile(r"[1-9][0-9]*")  # a version directory's name


def repository_fingerprint(root: str) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``root`` (symlinks followed) as (path, size, mtime in ns): what changes when
    a version directory, a model file or a config is added, replaced or removed."""
    seen = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue
            seen.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return tuple(seen)


class ModelControl:
    """The operator's model choices for one server, and the changes that apply them."""

    def __init__(self, server: InferenceServer) -> None:
        self.server = server
        settings = server.settings
        self.enabled = settings.model_control == "explicit"
        self.callers = settings.operators()
        self.timeout_s = settings.reload_timeout_s
        self.chosen = Choices()
        self.agreement = Agreement()  # what the trial's shadow runs found
        self.shadow_skipped = 0
        self.previous: dict[str, str] = {}  # model → the version that served before its last change
        self.errors: dict[str, str] = {}  # model → why its last change was refused
        self._lock = asyncio.Lock()  # one change at a time (the pool refuses a second anyway)
        self._changes: set[asyncio.Future[None]] = set()  # running on even if their caller went
        self._adopted: ModelState | None = None  # a shard's models at start (``adopt``)

    @property
    def pool(self) -> PipelinePool:
        if self.server.pool is None:
            raise Unavailable("the server is starting; retry when it serves")
        return self.server.pool

    def may_change(self, identity: Identity) -> bool:
        return self.enabled and identity.name in self.callers

    def check_caller(self, identity: Identity) -> None:
        if not self.enabled:
            raise PermissionDeniedError("model control is off on this server (--model-control none)")
        if identity.name not in self.callers:
            raise PermissionDeniedError(f"caller {identity.name!r} may not change models (--control-callers)")
        if self.server.settings.shard_index:  # a change made here alone would split the shards
            raise Refused("this is one shard of a server (--shards): change models on its main process, which "
                          "moves every shard (gRPC, or the local socket without the shard's suffix)")

    # --------------------------------------------------------------------------------- state
    def serving(self) -> dict[str, str]:
        return dict(self.pool.models)

    def route(self) -> int:
        """Which models answer the next batch: a draw against the trial's shares (on the loop)."""
        chosen = self.chosen
        if chosen.trial is None or not self.pool.report.candidate:
            return ROUTE_STABLE
        draw = random.random()
        return ROUTE_CANARY if draw < chosen.canary else ROUTE_SHADOW if draw < chosen.canary + chosen.shadow else 0

    def on_shadow(self, done: ShadowDone) -> None:
        """A worker's shadow run (the pool, on the loop)."""
        if done.skipped:
            self.shadow_skipped += 1
        else:
            self.agreement.add(done.agreement)
        self.server.metrics.shadow_done(done, self.chosen.trial)

    async def shadow_seen(self) -> tuple[Agreement, int]:
        """What the trial's shadow runs found, in this process and every other shard: the
        agreement and the runs skipped."""
        agreement, skipped = Agreement(), self.shadow_skipped
        agreement.add(self.agreement)
        if self.server.shards is not None:
            theirs, their_skipped = await self.server.shards.shadow()
            agreement.add(theirs)
            skipped += their_skipped
        return agreement, skipped

    def catalog(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """The models the workers reported, with the version directories on disk now (added since
        the workers last read the repository; a listing, never a parse: the workers judge them)."""
        listed = []
        for name, kind, versions in self.pool.report.catalog:
            try:
                found = {d for d in os.listdir(self.pool.repo_dir / name) if _VERSION.fullmatch(d)}
                found = {d for d in found if (self.pool.repo_dir / name / d / "model.onnx").is_file()}
            except OSError:
                found = set()
            listed.append((name, kind, tuple(sorted({*versions, *found}, key=int))))
        return listed

    def _model(self, name: str) -> tuple[str, tuple[str, ...]]:
        """(kind, versions on disk) of ``name``, or ``UnknownModel``."""
        for listed, kind, versions in self.catalog():
            if listed == name:
                return kind, versions
        raise UnknownModel(f"no model named {name!r} in the repository")

    # ------------------------------------------------------------------------------- changes
    async def load(self, name: str, version: str, who: str) -> None:
        """Serve ``version`` of ``name`` (empty: the version policy's choice, read again); loading
        the candidate's version promotes it and ends its trial."""
        if not name:
            if version:
                raise UnknownModel("a version needs the name of its model")
            return await self._change(lambda c: None, "", who, "reload", reread=True)
        self._version(name, version)

        def choose(c: Choices) -> None:
            c.unloaded.discard(name)
            if version:
                c.pins[name] = version
            else:
                c.pins.pop(name, None)
            if c.trial is not None and c.trial[0] == name:
                c.end_trial()  # promoted, or replaced by the operator's choice

        await self._change(choose, name, who, "load", reread=not version, version=version or None)

    async def unload(self, name: str, who: str) -> None:
        kind, _ = self._model(name)
        if kind == "detector":
            raise Refused(f"{name} is the detector: every image goes through it, it cannot be unloaded")

        def choose(c: Choices) -> None:
            c.unloaded.add(name)
            if c.trial is not None and c.trial[0] == name:
                c.end_trial()

        await self._change(choose, name, who, "unload")

    async def rollback(self, name: str, who: str) -> None:
        self._model(name)
        back = self.previous.get(name)
        if back is None:
            raise Refused(f"no earlier version of {name} served on this server: nothing to roll back to")
        await self._change(lambda c: c.pins.__setitem__(name, back), name, who, "rollback", version=back)

    async def trial(self, name: str, version: str, share: float, mode: str, who: str) -> None:
        """Set the ``mode`` ("canary" or "shadow") share of ``version`` of ``name``: loading it
        beside the serving version first if it is not the candidate yet (replacing another
        candidate); no share left of either kind ends the trial and unloads it."""
        self._version(name, version, required=True)
        if not 0.0 <= share <= 1.0:
            raise InvalidBatch(f"a share is between 0 and 1, got {share}")
        if name in self.chosen.unloaded:
            raise Refused(f"{name} is unloaded: load it before trying another version of it")
        if self.serving().get(name) == version:
            raise Refused(f"version {version} of {name} already serves: a candidate is another version")
        other = self.chosen.shadow if mode == "canary" else self.chosen.canary
        if self.chosen.trial == (name, version) and other + share > 1.0:
            raise InvalidBatch(f"canary and shadow shares add up to more than 1 ({share} + {other})")

        def choose(c: Choices) -> None:
            if c.trial != (name, version):
                c.end_trial()
                c.trial = (name, version)
            setattr(c, mode, share)
            if c.canary == 0.0 and c.shadow == 0.0:
                c.end_trial()

        await self._change(choose, name, who, mode, version=version, share=share)

    async def reread(self) -> None:
        """The repository's files changed (``--repository-poll-s``): move to what it holds now."""
        await self._change(lambda c: None, "", "repository poll", "reload", reread=True)

    def _version(self, name: str, version: str, required: bool = False) -> None:
        """``UnknownModel`` unless ``name`` is a model with ``version`` on disk (if given)."""
        _, versions = self._model(name)
        if required and not version:
            raise UnknownModel(f"which version of {name!r}? (it has {', '.join(versions) or 'none'})")
        if version and version not in versions:
            raise UnknownModel(f"model {name!r} has no version {version!r} (it has {', '.join(versions) or 'none'})")

    async def _change(
        self, choose: Callable[[Choices], None], name: str, who: str, action: str, reread: bool = False, **details: Any
    ) -> None:
        """Apply ``choose`` to a copy of the choices and move the workers there when what they load
        changes (a new share alone does not) or ``reread`` says the repository is to be read
        again; on refusal nothing changes and the reason is kept for ``ListModels``. The change
        runs to its end even if the call that asked for it is cancelled or overruns its deadline:
        what it did is recorded and audited all the same."""
        if self._lock.locked():
            raise Busy("another model change is under way; retry when it is done")
        change = asyncio.ensure_future(self._apply(choose, name, who, action, reread, details))
        self._changes.add(change)
        change.add_done_callback(self._changes.discard)
        await asyncio.shield(change)

    async def _apply(
        self, choose: Callable[[Choices], None], name: str, who: str, action: str, reread: bool, details: dict[str, Any]
    ) -> None:
        async with self._lock:
            chosen = self.chosen.copy()
            choose(chosen)
            before = self.serving()
            # A change touches only what it names: every other model keeps the version it serves,
            # even if its version policy would pick a newer directory that has appeared since.
            kept = {} if reread and not name else {m: v for m, v in before.items() if not (reread and m == name)}
            options = dataclasses.replace(
                self.pool.options, pins=tuple(sorted({**kept, **chosen.pins}.items())),
                unloaded=tuple(sorted(chosen.unloaded)), candidate=(chosen.trial,) if chosen.trial else (),
            )  # fmt: skip
            if options != self.pool.options or reread:
                audit.control(f"model {action} started", model=name or None, caller=who, **details)
            try:
                incomplete = await self._move(options, chosen, reread)
            except ReloadRefused as exc:
                why = self._redacted(str(exc))
                self.errors[name or "*"] = why
                audit.control(f"model {action} refused", model=name or None, caller=who, reason=why, **details)
                raise Refused(f"{action} of {name or 'the repository'} refused: {why}") from None
            self._commit(chosen, before, name)
            if incomplete:
                self.errors[name or "*"] = incomplete
            audit.control(f"model {action}", model=name or None, caller=who, serving=self.serving(),
                          incomplete=incomplete or None, **details)  # fmt: skip
            if incomplete:
                raise Incomplete(f"{action} of {name or 'the repository'} is made, but {incomplete}")

    async def _move(self, options: WorkerOptions, chosen: Choices, reread: bool) -> str:
        """Move this process's workers to ``options`` (when what they load changes, or ``reread``),
        then every other shard's to what they loaded: '' or why the change is not complete yet.
        ``ReloadRefused``: nothing changed, here or in any shard (one that refused puts the others
        and this process back)."""
        old, incomplete = self.pool.options, []
        if options != old or reread:
            try:
                await asyncio.to_thread(self.pool.reload, options, self.timeout_s)
            except ReloadIncomplete as exc:
                incomplete.append(f"{exc}; it serves the old models until its chunks are done")
        if (shards := self.server.shards) is None:
            return "; ".join(incomplete)
        try:
            state, previous = ModelState.of(self.pool.options, chosen, reread), ModelState.of(old, self.chosen, reread)
            incomplete += await shards.follow(state, previous)
        except ReloadRefused as exc:
            if self.pool.options != old:
                try:
                    await asyncio.to_thread(self.pool.reload, old, self.timeout_s)
                except (ReloadRefused, ReloadIncomplete) as back:
                    log.error("the main process's workers could not go back to the models before the change: %s", back)
                    raise ReloadRefused(f"{exc}; and the main process's workers could not go back: {back}") from None
            raise
        return "; ".join(incomplete)

    async def align_shards(self) -> None:
        """As the server starts: every shard serves the versions this process's workers loaded
        (each read the repository on its own as it started; a version that landed meanwhile
        could split them), and a shard started again is told them."""
        if (shards := self.server.shards) is not None:
            state = ModelState.of(self.pool.options, self.chosen)
            if incomplete := await shards.follow(state, state):
                log.warning("the shards are moving to the main process's models: %s", "; ".join(incomplete))

    async def follow(self, state: ModelState) -> None:
        """A shard: serve what the main process's workers serve now (``front.shards``).
        ``ReloadRefused``: nothing changed; ``ReloadIncomplete``: made, a worker is slow to go."""
        async with self._lock:
            before, options = self.serving(), state.options(self.pool.options)
            try:
                if options != self.pool.options or state.reread:
                    await asyncio.to_thread(self.pool.reload, options, self.timeout_s)
            except ReloadIncomplete:
                self._commit(state.choices(), before, "")
                raise
            self._commit(state.choices(), before, "")

    def first_options(self, options: WorkerOptions) -> WorkerOptions:
        """What the workers start with: ``options``, with the models a shard started again is told
        to serve (``adopt``)."""
        return options if self._adopted is None else self._adopted.options(options)

    def adopt(self, state: ModelState | None) -> None:
        """A shard started again serves the main process's models from its first worker on."""
        self._adopted = state
        if state is not None:
            self.chosen = state.choices()

    def _commit(self, chosen: Choices, before: dict[str, str], name: str) -> None:
        """The workers now run ``chosen``: remember it, and what each changed model served before."""
        if chosen.trial != self.chosen.trial:
            self.agreement, self.shadow_skipped = Agreement(), 0
        self.chosen = chosen
        after = self.serving()
        for model, version in before.items():
            if after.get(model) != version:
                self.previous[model] = version
        self.errors.pop(name or "*", None)
        self.server.follow_models()

    def _redacted(self, reason: str) -> str:
        """A worker's reason without the repository's place on the host (every caller may list it)."""
        root = self.pool.repo_dir
        for place in sorted({str(root.absolute()), os.path.realpath(root), str(root)}, key=len, reverse=True):
            reason = reason.replace(place, "<models>")
        return reason

    async def poll(self, interval_s: float) -> None:
        """Read the repository again whenever its files change (an asyncio task)."""
        root = str(self.pool.repo_dir)
        seen = await asyncio.to_thread(repository_fingerprint, root)
        while True:
            await asyncio.sleep(interval_s)
            now = await asyncio.to_thread(repository_fingerprint, root)
            if now == seen:
                continue
            log.info("the model repository changed: moving the workers to what it holds")
            try:
                await self.reread()
            except Busy:
                continue  # another change was under way: try again on the next pass
            except (Refused, Incomplete) as exc:
                log.warning("%s", exc.message)
            seen = now
