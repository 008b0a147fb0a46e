"""The operator's model choices, and the state a shard is told to serve.

``Choices`` is what operators chose on one server (``front.control.ModelControl`` keeps it).
``ModelState`` is what the main process of a server of several shards (``--shards``) sends each
shard after a change, and with the settings of a shard it starts again: the exact versions its own
workers loaded (every model pinned, so a version that lands on disk meanwhile changes nothing), the
models left out, the candidate under trial and its shares. A shard never chooses: it follows.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from infer_server.messages import WorkerOptions


@dataclass
class Choices:
    """What operators chose: versions pinned, attribute models unloaded, and the candidate under
    trial (model, version) with its shares of batches (canary answers, shadow runs beside)."""

    pins: dict[str, str] = field(default_factory=dict)
    unloaded: set[str] = field(default_factory=set)
    trial: tuple[str, str] | None = None
    canary: float = 0.0
    shadow: float = 0.0

    def copy(self) -> Choices:
        return dataclasses.replace(self, pins=dict(self.pins), unloaded=set(self.unloaded))

    def end_trial(self) -> None:
        self.trial, self.canary, self.shadow = None, 0.0, 0.0


@dataclass(frozen=True)
class ModelState:
    """What a shard's workers load and how it routes batches (see the module's docstring);
    ``reread``: the main process read the repository again (a poll, a reload of everything), so
    the shard's workers start again on the same versions even if nothing here changed."""

    pins: tuple[tuple[str, str], ...] = ()
    unloaded: tuple[str, ...] = ()
    candidate: tuple[tuple[str, str], ...] = ()
    canary: float = 0.0
    shadow: float = 0.0
    reread: bool = False

    @classmethod
    def of(cls, options: WorkerOptions, chosen: Choices, reread: bool = False) -> ModelState:
        """The state of a server whose workers run ``options`` under ``chosen``."""
        return cls(options.pins, options.unloaded, options.candidate, chosen.canary, chosen.shadow, reread)

    def options(self, base: WorkerOptions) -> WorkerOptions:
        """``base`` (a shard's own options) with these models."""
        return dataclasses.replace(base, pins=self.pins, unloaded=self.unloaded, candidate=self.candidate)

    def choices(self) -> Choices:
        trial = self.candidate[0] if self.candidate else None
        pins, unloaded = dict(self.pins), set(self.unloaded)
        return Choices(pins, unloaded, trial, self.canary if trial else 0.0, self.shadow if trial else 0.0)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelState:
        """The state ``to_json`` wrote (from the main process; a malformed one is ``ValueError``)."""
        try:
            return cls(
                pins=tuple((str(m), str(v)) for m, v in data["pins"]),
                unloaded=tuple(str(m) for m in data["unloaded"]),
                candidate=tuple((str(m), str(v)) for m, v in data["candidate"]),
                canary=float(data["canary"]), shadow=float(data["shadow"]), reread=bool(data["reread"]),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a model state: {json.dumps(data)[:200]}") from exc
