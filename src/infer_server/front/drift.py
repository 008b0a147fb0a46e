"""The drift watch: are the images the server answers still like the ones its detector was
validated on? In the server's main process, on the loop.

Every image answered OK adds its statistics (``infer_server.profile.observe``) to a sliding window
of the last ``--drift-window`` images (500), binned as the detector's reference profile bins them
(``profile.json``, reported by the workers with the models, so it always belongs to the version
that serves); the bin counts are kept up to date as images enter and leave, so an image costs a few
dictionary updates. Every ``--drift-interval-s`` (10 s), once the window holds
``--drift-min-images`` (200), each statistic's population stability index against the reference is
computed; one over ``--drift-threshold`` (0.25) flags the statistic. A flag that turns on or off
is logged and leaves an audit line; scores and flags are Prometheus gauges and the control API's
``GetDrift``. A model change that brings another profile starts a fresh window.

On a server of several shards (``--shards``) each shard keeps its own window of the images its
workers answered; the main process judges their union (the shards' bin counts on the same
reference, asked on their links at each evaluation) as one window of ``--drift-window`` images,
each shard's counts in proportion when together they hold more, and only it logs and flags.

``docs/model-lifecycle.md`` has the false-alarm rate on held-out scenes of the training
distribution and the delay on shifted streams, measured by ``benchmarks/drift.py``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from infer_server.front import audit
from infer_server.messages import ImageOutcome
from infer_server.profile import Reference, load_profile, observe

log = logging.getLogger(__name__)


@dataclass
class Score:
    psi: float = 0.0
    flagged: bool = False


class DriftMonitor:
    """A sliding window of answered images' statistics and its scores against a reference."""

    def __init__(self, window: int, threshold: float = 0.25, min_images: int = 200) -> None:
        self.window, self.threshold, self.min_images = window, threshold, min_images
        self.references: dict[str, Reference] = {}
        self.profile_text = ""
        self.source = ""  # what the reference was computed on
        self.model: tuple[str, str] = ("", "")  # the detector and its version the profile belongs to
        self.scores: dict[str, Score] = {}
        self._images: collections.deque[list[tuple[str, list[str]]]] = collections.deque()
        self._counts: dict[str, collections.Counter[str]] = {}
        self._others = 0  # images in the other shards' windows, at the last evaluation

    @property
    def enabled(self) -> bool:
        return self.window > 0 and bool(self.references)

    @property
    def images(self) -> int:
        """Images in the window judged: this process's, and the other shards' at the last evaluation,
        counted as at most ``window`` (their union is judged in those proportions: ``evaluate``)."""
        return min(self._union, self.window)

    @property
    def _union(self) -> int:
        """Images in this process's window and the other shards' at the last evaluation."""
        return len(self._images) + self._others

    @property
    def flagged(self) -> bool:
        return any(s.flagged for s in self.scores.values())

    def use(self, profile_text: str, model: tuple[str, str]) -> None:
        """The detector that serves brings ``profile_text`` (``profile.json``, or "" for none)."""
        if profile_text == self.profile_text and model == self.model:
            return
        self.profile_text, self.model = profile_text, model
        try:
            self.references = load_profile(profile_text) if profile_text else {}
            self.source = _source(profile_text)
        except ValueError as exc:
            log.warning("the detector's reference profile is unusable, no drift watch: %s", exc)
            self.references, self.source = {}, ""
        self._images.clear()
        self._counts = {name: collections.Counter() for name in self.references}
        self.scores, self._others = {}, 0

    def export(self) -> dict[str, Any]:
        """This window's bin counts, with the detector they were binned for (``front.shard_link``)."""
        counts = {name: {k: n for k, n in c.items() if n > 0} for name, c in self._counts.items()}
        return {"model": list(self.model), "images": len(self._images), "counts": counts}

    def observe(self, *outcomes: ImageOutcome) -> None:
        """Answered images (on the loop, for every image: a few dictionary updates)."""
        if self.enabled:
            for outcome in outcomes:
                self._observe(outcome)

    def _observe(self, outcome: ImageOutcome) -> None:
        entry = []
        for name, values in observe(outcome).items():
            reference = self.references.get(name)
            if reference is not None and values:
                bins = [reference.bin(v) for v in values]
                self._counts[name].update(bins)
                entry.append((name, bins))
        if not entry:
            return
        self._images.append(entry)
        if len(self._images) > self.window:
            for name, bins in self._images.popleft():
                self._counts[name].subtract(bins)

    def evaluate(self, others: Sequence[dict[str, Any]] = ()) -> None:
        """Score every statistic against the reference, over this window and ``others`` (the other
        shards' ``export``; those binned for another detector version are left out); log and
        audit a flag that turns."""
        others = [o for o in others if tuple(o["model"]) == self.model]
        self._others = sum(int(o["images"]) for o in others)
        if not self.enabled or self.images < self.min_images:
            return
        # The shards' windows together hold up to K windows of images: judged as one window of them,
        # each shard's counts in proportion (the score is of shares; smoothing is per image).
        scale = min(1.0, self.window / max(1, self._union))
        for name, reference in self.references.items():
            total = collections.Counter({k: n for k, n in self._counts[name].items() if n > 0})
            for other in others:
                total.update(other["counts"].get(name, {}))
            counts = {k: n * scale for k, n in total.items()}
            if not counts:
                continue
            score = Score(reference.psi(counts))
            score.flagged = score.psi > self.threshold
            was = self.scores.get(name)
            self.scores[name] = score
            if score.flagged != (was.flagged if was else False):
                turned = "drifted" if score.flagged else "back in line"
                log.warning("drift: %s %s (PSI %.3f, threshold %.2f, over the last %d images)",
                            name, turned, score.psi, self.threshold, self.images)  # fmt: skip
                audit.control("drift", statistic=name, psi=round(score.psi, 4), flagged=score.flagged,
                              model=self.model[0], version=self.model[1])  # fmt: skip

    async def run(self, interval_s: float, others: Callable[[], Awaitable[list[dict[str, Any]]]] | None = None) -> None:
        """Evaluate every ``interval_s``, with the other shards' windows if ``others`` asks them."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.evaluate(await others() if others is not None else ())
            except (KeyError, TypeError, ValueError) as exc:  # a malformed window from a shard: the next pass
                log.error("the drift watch could not judge this pass: %r", exc)


def _source(profile_text: str) -> str:
    import json

    return str(json.loads(profile_text).get("source", "")) if profile_text else ""
