"""The server's Prometheus metrics: what a scrape shows after a few outcomes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infer_server.front.metrics import _STAGE_BUCKETS, ServerMetrics
from infer_server.messages import Code, ImageOutcome

OUTCOMES = [
    ImageOutcome("b", 0, "a", timings_ms=(("read", 0.4), ("decode", 12.0), ("queue", 1.0))),
    ImageOutcome("b", 1, "b", timings_ms=(("read", 1.0), ("decode", 6000.0))),  # read on a bound; decode past the last
    ImageOutcome("b", 2, "c", code=Code.DATA_LOSS, message="image 2: batch data was truncated"),
]


def samples(registry: CollectorRegistry, names: set[str]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        if family.name in names
        for s in family.samples
    }


def test_a_scrape_shows_what_prometheus_own_counter_and_histogram_would() -> None:
    metrics = ServerMetrics(lambda: 7)
    metrics.batch_accepted(3)
    for outcome in OUTCOMES:
        metrics.image_done(outcome)

    reference = CollectorRegistry()
    images = Counter("infer_images", "Images answered, by status code", ["code"], registry=reference)
    stages = Histogram("infer_stage_seconds", "", ["stage"], buckets=_STAGE_BUCKETS, registry=reference)
    for code in Code:
        images.labels(code.name)
    for outcome in OUTCOMES:
        images.labels(Code(outcome.code).name).inc()
        for stage, ms in outcome.timings_ms:
            stages.labels(stage).observe(ms / 1000.0)

    families = {"infer_images", "infer_stage_seconds"}
    got, want = samples(metrics.registry, families), samples(reference, families)
    assert {s for s in got if not s[0].endswith("_created")} == {s for s in want if not s[0].endswith("_created")}
    assert ("infer_images_total", (("code", "OK"),), 2.0) in got
    assert ("infer_stage_seconds_bucket", (("le", "0.001"), ("stage", "read")), 2.0) in got
    assert ("infer_stage_seconds_bucket", (("le", "5.0"), ("stage", "decode")), 1.0) in got
    assert ("infer_stage_seconds_bucket", (("le", "+Inf"), ("stage", "decode")), 2.0) in got
    text = generate_latest(metrics.registry).decode()
    assert "infer_inflight_images 7.0" in text and "infer_batches_total 1.0" in text
