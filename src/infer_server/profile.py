"""What the images a model sees look like, and how far a stream of them has moved from that.

A *reference profile* (``profile.json`` beside the detector's ``model.onnx``) holds, for every
statistic below, its distribution on the model's validation scenes: written by the recipe
(``python -m engines.profile``), shipped with the model, read by the workers and handed to the front
(``WorkerReady.profile``), where ``front.drift`` keeps a sliding window of the same statistics of the
images it answers and compares the two with the population stability index.

Statistics, from each image answered OK (``observe``):

- per image: ``brightness`` and ``contrast`` (mean and standard deviation of the pixels at the
  detector's input size, 0..255, computed in the decode graph), ``width``, ``height``, ``aspect``
  (width / height), ``detections`` (how many: 0..9, "10+");
- per detection: ``confidence``, ``class`` (its label);
- per attribute model M: ``attribute:M`` (the label it gave each detection it ran on).

Continuous statistics are binned at the reference's deciles (ties merged, so a constant, such as
one image size, is one bin); categorical ones by value. PSI = Σ (w − r)·ln(w / r) over the bins,
with w the window's shares (half an observation added to each bin, so that a bin a window happens
to miss is not a change) and r the reference's (at least 1e-3). The usual reading:
< 0.1 no change, 0.1–0.25 a moderate one, > 0.25 a significant one (the default flag).
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

from infer_server.messages import Code, ImageOutcome

CONTINUOUS = ("brightness", "contrast", "width", "height", "aspect", "confidence")
PER_DETECTION = ("confidence", "class")
_FLOOR = 1e-3
_DECILES = [q / 10 for q in range(1, 10)]


def observe(outcome: ImageOutcome) -> dict[str, list[Any]]:
    """The statistics of one answered image (nothing for an image that failed)."""
    if outcome.code != Code.OK or not outcome.height:
        return {}
    count = len(outcome.detections)
    values: dict[str, list[Any]] = {
        "width": [outcome.width], "height": [outcome.height], "aspect": [outcome.width / outcome.height],
        "detections": [str(count) if count < 10 else "10+"],
        "confidence": [d.score for d in outcome.detections], "class": [d.label for d in outcome.detections],
    }  # fmt: skip
    if len(outcome.input_stats) == 2:
        values["brightness"], values["contrast"] = [outcome.input_stats[0]], [outcome.input_stats[1]]
    for detection in outcome.detections:
        for attribute in detection.attributes:
            values.setdefault(f"attribute:{attribute.model}", []).append(attribute.label)
    return values


def _quantile(ordered: list[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


class Reference:
    """One statistic's reference distribution: bin edges (continuous) or categories, and shares."""

    def __init__(self, edges: list[float] | None, shares: Mapping[str, float]) -> None:
        self.edges, self.shares = edges, dict(shares)

    @classmethod
    def of(cls, name: str, values: list[Any]) -> Reference:
        """The reference of ``values`` (the recipe's validation images)."""
        if name in CONTINUOUS:
            ordered = sorted(float(v) for v in values)
            edges = sorted({_quantile(ordered, q) for q in _DECILES}) if ordered else []
            in_bin = [0] * (len(edges) + 1)
            for v in ordered:
                in_bin[bisect.bisect_right(edges, v)] += 1
            return cls(edges, {str(i): c / max(1, len(ordered)) for i, c in enumerate(in_bin)})
        counts: dict[str, int] = {}
        for v in values:
            counts[str(v)] = counts.get(str(v), 0) + 1
        return cls(None, {k: c / max(1, len(values)) for k, c in sorted(counts.items())})

    def bin(self, value: Any) -> str:
        return str(bisect.bisect_right(self.edges, float(value))) if self.edges is not None else str(value)

    def psi(self, counts: Mapping[str, float]) -> float:
        """Population stability index of a window's bin counts against this reference. The window's
        shares are smoothed (half an observation added to every bin) so that a bin a small window
        happens to miss does not count as a change; a reference share is at least 1e-3."""
        total = sum(counts.values())
        if not total:
            return 0.0
        keys = set(self.shares) | set(counts)
        score = 0.0
        for key in keys:
            r = max(self.shares.get(key, 0.0), _FLOOR)
            w = (counts.get(key, 0) + 0.5) / (total + 0.5 * len(keys))
            score += (w - r) * math.log(w / r)
        return score

    def to_json(self) -> dict[str, Any]:
        return {"edges": self.edges, "shares": self.shares} if self.edges is not None else {"shares": self.shares}


def build_profile(outcomes: Iterable[ImageOutcome], source: str) -> dict[str, Any]:
    """A reference profile (JSON-ready) from the outcomes of a model's validation images."""
    samples: dict[str, list[Any]] = {}
    images = 0
    for outcome in outcomes:
        seen = observe(outcome)
        images += bool(seen)
        for name, values in seen.items():
            samples.setdefault(name, []).extend(values)
    statistics = {name: Reference.of(name, values).to_json() for name, values in sorted(samples.items())}
    return {"source": source, "images": images, "statistics": statistics}


def load_profile(text: str) -> dict[str, Reference]:
    """The references of a ``profile.json`` text (``ValueError`` if it is not one)."""
    try:
        raw = json.loads(text)
        return {name: Reference(ref.get("edges"), ref["shares"]) for name, ref in raw["statistics"].items()}
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a reference profile: {exc}") from None
