"""The Grafana dashboard: the committed JSON is what its panel list writes, and each panel's query
computes from samples what its PromQL means."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.dashboard import PANELS, Query, dashboard, parse

COMMITTED = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "infer-server.json"


def test_the_committed_dashboard_is_the_panel_lists() -> None:
    assert json.loads(COMMITTED.read_text()) == dashboard(), f"python -m benchmarks.dashboard --json {COMMITTED}"
    assert len(dashboard()["panels"]) == len(PANELS)


def scrape(t: float, ok: float, failed: float, le: dict[float, float]) -> tuple[float, dict]:  # type: ignore[type-arg]
    lines = [f'infer_images_total{{code="OK"}} {ok}', f'infer_images_total{{code="INTERNAL"}} {failed}']
    lines += [f'infer_stage_seconds_bucket{{le="{k}",stage="queue"}} {v}' for k, v in le.items()]
    return t, parse("\n".join(["# HELP x y", *lines]))


def test_rates_quantiles_and_ratios_from_scrapes() -> None:
    series = [
        scrape(0.0, 100, 0, {0.1: 0, 1.0: 0, float("inf"): 0}),
        scrape(60.0, 700, 60, {0.1: 50, 1.0: 100, float("inf"): 100}),
    ]
    assert Query("rate", "infer_images_total", by=("code",)).evaluate(series, 1) == {("OK",): 10.0, ("INTERNAL",): 1.0}
    errors = Query("rate", "infer_images_total", by=("code",), where=(("code", "!OK"),))
    assert errors.evaluate(series, 1) == {("INTERNAL",): 1.0}
    p50 = Query("quantile", "infer_stage_seconds", where=(("stage", "queue"),), q=0.5).evaluate(series, 1)
    assert abs(p50[()] - 0.1) < 1e-9  # half the observations are at or under 0.1 s
    p75 = Query("quantile", "infer_stage_seconds", where=(("stage", "queue"),), q=0.75).evaluate(series, 1)
    assert abs(p75[()] - 0.55) < 1e-9  # linear within the (0.1, 1.0] bucket, as histogram_quantile
    failed = Query("rate", "infer_images_total", where=(("code", "!OK"),))
    share = Query("ratio", of=failed, per=Query("rate", "infer_images_total")).evaluate(series, 1)
    assert abs(share[()] - 1 / 11) < 1e-9
    # As in PromQL, a ratio matches series by their labels: by code over a total matches nothing.
    assert Query("ratio", of=errors, per=Query("rate", "infer_images_total")).evaluate(series, 1) == {}
