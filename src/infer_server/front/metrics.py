"""Prometheus metrics of one server (optional ``--metrics-port``), updated from the event loop.

Owned by ``front.server.InferenceServer`` in the server's main process. Each server has its own
``CollectorRegistry`` so that several servers in one process (tests) do not collide; the HTTP
exporter only runs when a metrics port is configured.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from infer_server.messages import Code, ImageOutcome, ShadowDone

log = logging.getLogger(__name__)

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
_MODEL_COUNTERS = (
    ("infer_model_inference_success", "Images answered OK, by model and version"),
    ("infer_model_queue_seconds", "Time answered images waited for a worker"),
    ("infer_model_compute_seconds", "Pipeline time of answered images (decode to attributes)"),
)


class _CacheCollector(Collector):
    """Reads the cache's own counters at scrape time: nothing is counted twice on the hot path."""

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        c = self._cache
        for name, doc, value in (
            ("infer_cache_hits", "Images answered from the result cache", c.hits),
            ("infer_cache_misses", "Images looked up in the result cache and not found", c.misses),
            ("infer_cache_evictions", "Result cache entries evicted", c.evictions),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        yield GaugeMetricFamily("infer_cache_entries", "Entries in the result cache", value=len(c))
        yield GaugeMetricFamily("infer_cache_bytes", "Estimated bytes held by the result cache", value=c.bytes)


class _StagingCollector(Collector):
    """The staging tiers' bytes and the spill count, read at scrape time."""

    def __init__(self, handoff: Any) -> None:
        self._handoff = handoff

    def collect(self) -> Iterator[Metric]:
        tiers = GaugeMetricFamily("infer_staged_bytes", "Bytes of inline batches staged, per tier", labels=["tier"])
        for number, staged in enumerate(self._handoff.staged_bytes):
            tiers.add_metric(["staging" if number == 0 else "spill"], staged)
        yield tiers
        yield CounterMetricFamily("infer_staging_spills", "Inline batches staged on disk", value=self._handoff.spills)
        yield CounterMetricFamily(
            "infer_staging_demotions", "Staged batches moved from staging to disk", value=self._handoff.demotions
        )


class _ModelsCollector(Collector):
    """The versions in service and the trial, read from ``ModelControl`` at scrape time."""

    def __init__(self, control: Any) -> None:
        self._control = control

    def collect(self) -> Iterator[Metric]:
        if self._control.server.pool is None:
            return
        versions = GaugeMetricFamily("infer_model_version", "Model versions loaded (1), by role",
                                     labels=["model", "version", "role"])  # fmt: skip
        for name, version in self._control.serving().items():
            versions.add_metric([name, version, "serving"], 1)
        chosen = self._control.chosen
        shares = GaugeMetricFamily("infer_trial_share", "Share of batches of the candidate under trial",
                                   labels=["model", "version", "mode"])  # fmt: skip
        if chosen.trial is not None:
            versions.add_metric([*chosen.trial, "candidate"], 1)
            shares.add_metric([*chosen.trial, "canary"], chosen.canary)
            shares.add_metric([*chosen.trial, "shadow"], chosen.shadow)
        yield versions
        yield shares


class _DriftCollector(Collector):
    """The drift watch's scores and flags (``front.drift``), read at scrape time."""

    def __init__(self, monitor: Any) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        m = self._monitor
        labels = ["model", "version", "statistic"]
        psi = GaugeMetricFamily("infer_drift_psi", "Population stability index against the reference", labels=labels)
        flag = GaugeMetricFamily("infer_drift_flag", "1 when the statistic's PSI is over the threshold", labels=labels)
        for name, score in sorted(m.scores.items()):
            psi.add_metric([*m.model, name], score.psi)
            flag.add_metric([*m.model, name], float(score.flagged))
        yield psi
        yield flag
        yield GaugeMetricFamily("infer_drift_window_images", "Images in the drift window", value=m.images)


# What the images of a run share: timings (stage, ms), models (name, version), pipeline batch size.
_Shared = tuple[tuple[tuple[str, float], ...], tuple[tuple[str, str], ...], int]


class _Series:
    """One histogram's counts: per bucket, not cumulative (the last is +Inf), and the sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts, self.sum = [0] * (buckets + 1), 0.0

    def observe(self, value: float, bounds: tuple[float, ...], n: int = 1) -> None:
        """``n`` observations of ``value``."""
        self.counts[bisect_left(bounds, value)] += n  # le: the first bound >= value
        self.sum += value * n

    def buckets(self, bounds: tuple[float, ...]) -> list[tuple[str, float]]:
        """Prometheus's cumulative ``le`` buckets, ``+Inf`` last."""
        counts, total = list(self.counts), 0  # a copy: the loop may count on while this runs
        cumulative = []
        for le, n in zip((*map(floatToGoString, bounds), "+Inf"), counts, strict=True):
            total += n
            cumulative.append((le, float(total)))
        return cumulative


class _ImageCounts(Collector):
    """What the loop counts per pushed batch and per answered image, as plain numbers turned into
    Prometheus families at scrape time. prometheus_client's ``Counter`` and ``Histogram`` take a lock
    per update and walk the buckets in Python per observation: ~5 µs of the loop per image with the
    null model, 12 µs with the full pipeline; these updates cost ~1 µs (docs/performance.md).

    Exports what those would: ``infer_batches``, ``infer_images_admitted``, ``infer_images{code}``,
    ``infer_stage_seconds{stage}``, ``infer_batch_images`` and, per model and version,
    ``infer_model_inference_success``, ``infer_model_queue_seconds`` and
    ``infer_model_compute_seconds``. Only the loop writes them; a scrape (another thread) reads
    under the GIL, so it may see one image counted in a bucket and not yet in the sum, as
    prometheus_client's own histograms may."""

    def __init__(self) -> None:
        self.created = time.time()
        self.batches = self.admitted = 0
        self.codes = dict.fromkeys(Code, 0)  # an IntEnum: a plain int finds its entry too
        self.stages: dict[str, _Series] = {}
        self.batch_images = _Series(len(_BATCH_BUCKETS))
        self.models: dict[tuple[str, str], list[float]] = {}  # [images OK, queue s, compute s]

    def collect(self) -> Iterator[Metric]:
        yield self._counter("infer_batches", "Batches accepted by PushData", [((), self.batches)])
        yield self._counter("infer_images_admitted", "Images in accepted batches", [((), self.admitted)])
        yield self._counter("infer_images", "Images answered, by status code",
                            [((code.name,), n) for code, n in list(self.codes.items())], ["code"])  # fmt: skip
        stages = HistogramMetricFamily("infer_stage_seconds", "Per-image time per pipeline stage", labels=["stage"])
        for stage, series in list(self.stages.items()):
            stages.add_metric([stage], series.buckets(_STAGE_BUCKETS), series.sum)
        yield stages
        batch_images = HistogramMetricFamily(
            "infer_batch_images", "Images in the pipeline batch each answered image ran in (dynamic batching)",
            buckets=self.batch_images.buckets(_BATCH_BUCKETS), sum_value=self.batch_images.sum,
        )  # fmt: skip
        yield batch_images
        models = list(self.models.items())
        for column, (name, doc) in enumerate(_MODEL_COUNTERS):
            yield self._counter(name, doc, [(m, values[column]) for m, values in models], ["model", "version"])

    def _counter(self, name: str, doc: str, values: list[tuple[Any, float]], labels: Sequence[str] = ()) -> Metric:
        family = CounterMetricFamily(name, doc, labels=labels)
        for label_values, value in values:
            family.add_metric(label_values, value, created=self.created)
        return family


# Families that are the whole server's, not each shard's: the main process's alone are exported.
# The health flips and front processes are the main process's; every shard serves the same models and
# trial shares (``front.choices``); the main process judges the drift of every shard's window.
_SERVER_WIDE = frozenset(
    {"infer_health_changes", "infer_front_process_exits", "infer_model_version", "infer_trial_share",
     "infer_drift_psi", "infer_drift_flag", "infer_drift_window_images"}
)  # fmt: skip


class _Merged(Collector):
    """A server of several shards, scraped: this process's families with every other shard's added
    to them, sample by sample (counters, histograms and gauges such as images in flight are sums
    over the shards), except the families that are the whole server's (``_SERVER_WIDE``)."""

    def __init__(self, own: CollectorRegistry, others: Callable[[], list[list[Any]]]) -> None:
        self._own, self._others = own, others

    def collect(self) -> Iterator[Metric]:
        families = {family.name: family for family in self._own.collect()}
        try:
            others = self._others()
        except Exception as exc:  # noqa: BLE001 - a scrape answers with what it has
            log.warning("the other shards' metrics are left out of this scrape: %r", exc)
            others = []
        for name, kind, doc, samples in others:
            if name in _SERVER_WIDE:
                continue
            family = families.get(name)
            if family is None:
                family = families[name] = Metric(name, doc, kind)
            index = {(s.name, tuple(sorted(s.labels.items()))): n for n, s in enumerate(family.samples)}
            for sample, labels, value in samples:
                n = index.get((sample, tuple(sorted(labels.items()))))
                if n is None:
                    family.samples.append(Sample(sample, labels, value))
                elif not sample.endswith("_created"):  # when counting began: this process's
                    family.samples[n] = family.samples[n]._replace(value=family.samples[n].value + value)
        yield from families.values()


def carried(families: list[list[Any]]) -> list[list[Any]]:
    """What exported ``families`` counted (counters, histograms, summaries; their ``_created``
    samples left out), each sample summed over the families of one name: what a shard's earlier
    runs add to its counts, so that a shard started again (counting from 0) takes nothing away."""
    kept: dict[str, tuple[str, str, dict[tuple[str, str], list[Any]]]] = {}
    for name, kind, doc, samples in families:
        if kind not in ("counter", "histogram", "summary"):
            continue
        summed = kept.setdefault(name, (kind, doc, {}))[2]
        for sample, labels, value in samples:
            if not sample.endswith("_created"):
                key = (sample, json.dumps(labels, sort_keys=True))
                summed.setdefault(key, [sample, labels, 0.0])[2] += value
    return [[name, kind, doc, list(summed.values())] for name, (kind, doc, summed) in kept.items()]


class ServerMetrics:
    def __init__(self, inflight_images: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._counts = _ImageCounts()
        self.registry.register(self._counts)
        inflight = Gauge("infer_inflight_images", "Images admitted and not answered yet", registry=self.registry)
        inflight.set_function(lambda: float(inflight_images()))
        self._http: Any = None
        r = self.registry
        self._serving: bool | None = None
        self._health_changes = Counter("infer_health_changes", "Changes of the health status, by the new status",
                                       ["status"], registry=r)  # fmt: skip
        self.front_exits = Counter("infer_front_process_exits", "gRPC front processes (--fronts) that exited "
                                   "unasked and were started again", registry=r)  # fmt: skip
        self._shadow = {
            field: Counter(f"infer_shadow_{field}", f"Shadow runs of the candidate: {field.replace('_', ' ')}",
                           ["model", "version"], registry=r)  # fmt: skip
            for field in ("images", "stable_detections", "candidate_detections", "matched", "labels_agree",
                          "attributes_compared", "attributes_agree", "skipped")  # fmt: skip
        }

    def health(self, serving: bool) -> None:
        """The health service's status, set: a change of it is counted (blips a watch may miss)."""
        if serving != self._serving:
            self._serving = serving
            self._health_changes.labels("SERVING" if serving else "NOT_SERVING").inc()

    def batch_accepted(self, images: int) -> None:
        counts = self._counts
        counts.batches += 1
        counts.admitted += images

    def images_done(self, outcomes: Iterable[ImageOutcome]) -> None:
        """Count answered images: by code, per stage, the pipeline batch each ran in and, per model
        and version, Triton's nv_inference_* convention (every model of an image's pipeline counts
        it; cumulative seconds, so that rate(sum) / rate(count) is the mean). The images of a
        chunk mostly share their timings, models and batch: each run of those is counted once,
        times its length."""
        codes, run = self._counts.codes, 0
        last: _Shared | None = None
        for outcome in outcomes:
            codes[outcome.code] += 1
            shared = (outcome.timings_ms, outcome.models, outcome.batch_images)
            if shared == last:
                run += 1
                continue
            if last is not None:
                self._count_run(last, run)
            run, last = 1, shared
        if last is not None:
            self._count_run(last, run)

    def _count_run(self, shared: _Shared, n: int) -> None:
        """``n`` images of the same timings, models and pipeline batch size, counted."""
        timings, models, batch_images = shared
        counts = self._counts
        if batch_images:
            counts.batch_images.observe(batch_images, _BATCH_BUCKETS, n)
        queue_ms = compute_ms = 0.0
        stages = counts.stages
        for stage, ms in timings:
            series = stages.get(stage)
            if series is None:
                series = stages[stage] = _Series(len(_STAGE_BUCKETS))
            series.observe(ms / 1000.0, _STAGE_BUCKETS, n)
            if stage == "queue":
                queue_ms = ms
            elif stage != "read":
                compute_ms += ms
        for model in models:
            values = counts.models.get(model)
            if values is None:
                values = counts.models[model] = [0, 0.0, 0.0]
            values[0] += n
            values[1] += queue_ms / 1000.0 * n
            values[2] += compute_ms / 1000.0 * n

    def shadow_done(self, done: ShadowDone, trial: tuple[str, str] | None) -> None:
        """A shadow run's counts, under the candidate's model and version."""
        if trial is None:
            return
        if done.skipped:
            self._shadow["skipped"].labels(*trial).inc()
            return
        for field, value in vars(done.agreement).items():
            if value:
                self._shadow[field].labels(*trial).inc(value)

    def watch_drift(self, monitor: Any) -> None:
        """Export the drift watch's scores and flags (a ``DriftMonitor``)."""
        self.registry.register(_DriftCollector(monitor))

    def watch_models(self, control: Any) -> None:
        """Export which versions serve and which is under trial, with its shares (a ``ModelControl``)."""
        self.registry.register(_ModelsCollector(control))

    def watch_staging(self, handoff: Any) -> None:
        """Export the staging tiers' bytes and spills (a ``Handoff``)."""
        self.registry.register(_StagingCollector(handoff))

    def watch_cache(self, cache: Any) -> None:
        """Export the result cache's counters (an ``LRUKCache``: hits, misses, evictions, size)."""
        self.registry.register(_CacheCollector(cache))

    def export(self) -> list[list[Any]]:
        """Every family as plain values, ``[name, type, help, [[sample, labels, value], ...]]``:
        what a shard sends the main process for its scrape (``front.shard_link``)."""
        return [
            [f.name, f.type, f.documentation, [[s.name, s.labels, s.value] for s in f.samples]]
            for f in self.registry.collect()
        ]

    def serve(self, port: int, host: str, shards: Any = None) -> None:
        """The exporter on ``port``; with ``shards`` (``front.shards.ShardProcesses``) every scrape
        adds the other shards' families to this process's (``_Merged``)."""
        registry = self.registry
        if shards is not None:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Merged(self.registry, shards.families))
        result = start_http_server(port, addr=host, registry=registry)
        self._http = result[0] if isinstance(result, tuple) else None

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
