"""The server's Prometheus metrics: what a scrape shows after a few outcomes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from infer_server.front.metrics import _STAGE_BUCKETS, ServerMetrics, _Merged, carried
from infer_server.messages import Code, ImageOutcome

MODELS = (("detector", "3"), ("color", "1"))
OUTCOMES = [
    ImageOutcome("b", 0, "a", timings_ms=(("read", 0.4), ("decode", 12.0), ("queue", 1.0)), models=MODELS,
                 batch_images=3),  # fmt: skip
    # read on a bucket's bound, decode and batch_images past the last bound
    ImageOutcome("b", 1, "b", timings_ms=(("read", 1.0), ("decode", 6000.0)), batch_images=300),
    ImageOutcome("b", 2, "c", code=Code.DATA_LOSS, message="image 2: batch data was truncated", batch_images=8),
    ImageOutcome("c", 0, "d", timings_ms=(("queue", 0.5), ("detector", 30.0), ("attributes", 2.5)), models=MODELS[:1]),
]
FAMILIES = {"infer_batches", "infer_images_admitted", "infer_images", "infer_stage_seconds", "infer_batch_images",
            "infer_model_inference_success", "infer_model_queue_seconds", "infer_model_compute_seconds"}  # fmt: skip


def samples(registry: CollectorRegistry, names: set[str]) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
        for family in text_string_to_metric_families(text)
        if family.name in names
        for s in family.samples
        if not s.name.endswith("_created")
    }


def reference_scrape(
    outcomes: list[ImageOutcome] = OUTCOMES, batches: int = 2, admitted: int = 4
) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
    """What prometheus_client's own Counter and Histogram show for ``outcomes``."""
    r = CollectorRegistry()
    Counter("infer_batches", "", registry=r).inc(batches)
    Counter("infer_images_admitted", "", registry=r).inc(admitted)
    images = Counter("infer_images", "", ["code"], registry=r)
    stages = Histogram("infer_stage_seconds", "", ["stage"], buckets=_STAGE_BUCKETS, registry=r)
    batch_images = Histogram("infer_batch_images", "", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
    success, queue, compute = (Counter(name, "", ["model", "version"], registry=r) for name in (
        "infer_model_inference_success", "infer_model_queue_seconds", "infer_model_compute_seconds"))  # fmt: skip
    for code in Code:
        images.labels(code.name)
    for outcome in outcomes:
        images.labels(Code(outcome.code).name).inc()
        if outcome.batch_images:
            batch_images.observe(outcome.batch_images)
        for stage, ms in outcome.timings_ms:
            stages.labels(stage).observe(ms / 1000.0)
        timings = dict(outcome.timings_ms)
        for model in outcome.models:
            success.labels(*model).inc()
            queue.labels(*model).inc(timings.get("queue", 0.0) / 1000.0)
            compute.labels(*model).inc(sum(v for k, v in timings.items() if k not in ("queue", "read")) / 1000.0)
    return samples(r, FAMILIES)


def test_a_scrape_shows_what_prometheus_own_counter_and_histogram_would() -> None:
    metrics = ServerMetrics(lambda: 7)
    metrics.batch_accepted(3)
    metrics.batch_accepted(1)
    metrics.images_done(OUTCOMES[:1])
    metrics.images_done(OUTCOMES[1:])

    got = samples(metrics.registry, FAMILIES)
    assert got == reference_scrape()
    assert ("infer_images_total", (("code", "OK"),), 3.0) in got
    assert ("infer_stage_seconds_bucket", (("le", "0.001"), ("stage", "read")), 2.0) in got
    assert ("infer_stage_seconds_bucket", (("le", "5.0"), ("stage", "decode")), 1.0) in got
    assert ("infer_stage_seconds_bucket", (("le", "+Inf"), ("stage", "decode")), 2.0) in got
    assert ("infer_batch_images_bucket", (("le", "256.0"),), 2.0) in got
    assert ("infer_model_inference_success_total", (("model", "detector"), ("version", "3")), 2.0) in got
    text = generate_latest(metrics.registry).decode()
    assert "infer_inflight_images 7.0" in text and "infer_batches_total 2.0" in text


def test_images_that_share_their_timings_models_and_batch_are_each_counted() -> None:
    """A chunk's images mostly share what is counted of them, and are counted as a run: every
    image of a run, a run broken by another image and taken up again, runs differing in one thing."""
    first, second, failed = OUTCOMES[0], OUTCOMES[1], OUTCOMES[2]
    other_batch = ImageOutcome("b", 5, "", timings_ms=first.timings_ms, models=MODELS, batch_images=8)
    other_models = ImageOutcome("b", 6, "", timings_ms=first.timings_ms, models=MODELS[1:], batch_images=3)
    outcomes = [first, first, first, second, first, first, failed, failed, other_batch, other_models, other_models]
    metrics = ServerMetrics(lambda: 0)
    metrics.batch_accepted(len(outcomes))
    metrics.images_done(outcomes)
    assert samples(metrics.registry, FAMILIES) == reference_scrape(outcomes, batches=1, admitted=len(outcomes))


def test_a_scrape_of_several_shards_is_one_servers_sums() -> None:
    """Two shards that each answered OUTCOMES once show what one server that answered them twice
    would; what is the whole server's (health flips) is the main process's alone, counted once."""
    main, shard, once_twice = ServerMetrics(lambda: 2), ServerMetrics(lambda: 5), ServerMetrics(lambda: 7)
    for metrics, rounds in ((main, 1), (shard, 1), (once_twice, 2)):
        for _ in range(rounds):
            metrics.batch_accepted(4)
            metrics.images_done(OUTCOMES)
        metrics.health(True)
    shard.health(False)  # the shard's own flips are not the server's
    merged = CollectorRegistry(auto_describe=False)
    merged.register(_Merged(main.registry, shard.export))
    assert samples(merged, FAMILIES) == samples(once_twice.registry, FAMILIES)
    text = generate_latest(merged).decode()
    assert "infer_inflight_images 7.0" in text  # 2 + 5
    assert 'infer_health_changes_total{status="SERVING"} 1.0' in text and "NOT_SERVING" not in text
    created = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "infer_batches_created"]
    assert len(created) == 1 and created[0].value == main._counts.created, "when counting began: the main process's"


def test_what_a_shard_counted_before_it_was_started_again_is_carried() -> None:
    """A shard started again counts from 0: what its earlier runs counted (counters and histograms,
    not gauges nor when counting began) is added, so that the server's counters never go down."""
    first, second = ServerMetrics(lambda: 3), ServerMetrics(lambda: 4)
    for metrics in (first, second):
        metrics.batch_accepted(4)
        metrics.images_done(OUTCOMES)
    kept = carried(first.export() + second.export())
    names = {name for name, *_ in kept}
    assert "infer_inflight_images" not in names and "infer_batches" in names
    assert all(not sample.endswith("_created") for *_, samples in kept for sample, _, _ in samples)
    batches = [value for name, _, _, samples in kept if name == "infer_batches" for _, _, value in samples]
    assert batches == [2.0]
    merged = CollectorRegistry(auto_describe=False)
    now = ServerMetrics(lambda: 0)  # the main process, counting nothing yet
    merged.register(_Merged(now.registry, lambda: kept))
    twice = ServerMetrics(lambda: 0)
    for _ in range(2):
        twice.batch_accepted(4)
        twice.images_done(OUTCOMES)
    assert samples(merged, FAMILIES) == samples(twice.registry, FAMILIES)
