"""Prometheus metrics of one server (optional ``--metrics-port``), updated from the event loop.

Owned by ``front.server.InferenceServer`` in the server's main process. Each server has its own
``CollectorRegistry`` so that several servers in one process (tests) do not collide; the HTTP
exporter only runs when a metrics port is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infer_server.messages import Code, ImageOutcome, ShadowDone

_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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


class ServerMetrics:
    def __init__(self, inflight_images: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self._batches = Counter("infer_batches", "Batches accepted by PushData", registry=self.registry)
        self._admitted = Counter("infer_images_admitted", "Images in accepted batches", registry=self.registry)
        self._images = Counter("infer_images", "Images answered, by status code", ["code"], registry=self.registry)
        self._stage = Histogram(
            "infer_stage_seconds",
            "Per-image time per pipeline stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=self.registry,
        )
        self._batch_images = Histogram(
            "infer_batch_images", "Images in the pipeline batch each answered image ran in (dynamic batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )  # fmt: skip
        inflight = Gauge("infer_inflight_images", "Images admitted and not answered yet", registry=self.registry)
        inflight.set_function(lambda: float(inflight_images()))
        self._http: Any = None
        # Labelled children looked up once: image_done runs on the event loop for every image.
        self._image_by_code = {code: self._images.labels(code.name) for code in Code}
        self._stage_by_name: dict[str, Any] = {}
        # Per model and version, Triton's nv_inference_* convention: counts and cumulative times
        # (rate(sum) / rate(count) is the mean); every model of an image's pipeline counts it.
        r = self.registry
        self._success = Counter("infer_model_inference_success", "Images answered OK, by model and version",
                                ["model", "version"], registry=r)  # fmt: skip
        self._queue_s = Counter("infer_model_queue_seconds", "Time answered images waited for a worker",
                                ["model", "version"], registry=r)  # fmt: skip
        self._compute_s = Counter("infer_model_compute_seconds", "Pipeline time of answered images (decode to "
                                  "attributes)", ["model", "version"], registry=r)  # fmt: skip
        self._serving: bool | None = None
        self._health_changes = Counter("infer_health_changes", "Changes of the health status, by the new status",
                                       ["status"], registry=r)  # fmt: skip
        self.front_exits = Counter("infer_front_process_exits", "gRPC front processes (--fronts) that exited "
                                   "unasked and were started again", registry=r)  # fmt: skip
        self._by_models: dict[tuple[tuple[str, str], ...], list[tuple[Any, Any, Any]]] = {}
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
        self._batches.inc()
        self._admitted.inc(images)

    def image_done(self, outcome: ImageOutcome) -> None:
        self._image_by_code[outcome.code].inc()  # Code is an IntEnum: a plain int finds its child too
        if outcome.batch_images:
            self._batch_images.observe(outcome.batch_images)
        queue_ms = compute_ms = 0.0
        for stage, ms in outcome.timings_ms:
            child = self._stage_by_name.get(stage)
            if child is None:
                child = self._stage_by_name[stage] = self._stage.labels(stage)
            child.observe(ms / 1000.0)
            if stage == "queue":
                queue_ms = ms
            elif stage != "read":
                compute_ms += ms
        if outcome.models:
            children = self._by_models.get(outcome.models)
            if children is None:
                children = self._by_models[outcome.models] = [
                    (self._success.labels(*m), self._queue_s.labels(*m), self._compute_s.labels(*m))
                    for m in outcome.models
                ]
            for success, queue, compute in children:
                success.inc()
                queue.inc(queue_ms / 1000.0)
                compute.inc(compute_ms / 1000.0)

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

    def serve(self, port: int, host: str) -> None:
        result = start_http_server(port, addr=host, registry=self.registry)
        self._http = result[0] if isinstance(result, tuple) else None

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
