"""The Grafana dashboard of ``deploy/grafana/infer-server.json``, from one list of panels, and a
picture of it drawn from a real server's metrics.

Every panel is a list of ``Query`` objects: each writes its PromQL for Grafana (``promql``) and
computes the same value from scraped samples (``evaluate``), so the picture shows what the
dashboard would. ``record`` runs a server with the embedded models through a short life (steady
load, a canary, a shadow candidate, a darker stream the drift watch should flag), scraping
``/metrics`` every second; ``render`` draws each panel from those scrapes.

    .venv/bin/python -m benchmarks.dashboard --json deploy/grafana/infer-server.json   # the JSON only
    .venv/bin/python -m benchmarks.dashboard --json deploy/grafana/infer-server.json --png docs/dashboard.png
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

Sample = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, labels) -> value, one scrape
_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
RATE_WINDOW_S = 60


def parse(text: str) -> Sample:
    """One Prometheus text exposition as (name, labels) -> value."""
    sample: Sample = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if match:
            labels = tuple(sorted(_LABEL.findall(match.group(2) or "")))
            sample[(match.group(1), labels)] = float(match.group(3))
    return sample


@dataclass(frozen=True)
class Query:
    """``rate``: per-second increase of a counter (summed by ``by``); ``gauge``: a gauge (by
    ``by``); ``quantile``: ``q`` of a histogram's rate; ``ratio``: ``of`` / ``per``."""

    kind: str
    metric: str = ""
    by: tuple[str, ...] = ()
    where: tuple[tuple[str, str], ...] = ()  # label = value; a value starting with "!" excludes it
    q: float = 0.0
    of: Query | None = None
    per: Query | None = None
    legend: str = ""

    def _selector(self, suffix: str = "") -> str:
        where = ",".join(f'{k}!="{v[1:]}"' if v.startswith("!") else f'{k}="{v}"' for k, v in self.where)
        return f"{self.metric}{suffix}" + (f"{{{where}}}" if where else "")

    def promql(self) -> str:
        by = f" by ({', '.join(self.by)})" if self.by else ""
        if self.kind == "rate":
            return f"sum{by} (rate({self._selector()}[1m]))"
        if self.kind == "gauge":
            return f"sum{by} ({self._selector()})"
        if self.kind == "quantile":
            return f"histogram_quantile({self.q}, sum by (le{', ' if self.by else ''}{', '.join(self.by)}) " \
                   f"(rate({self._selector('_bucket')}[1m])))"  # fmt: skip
        assert self.of is not None and self.per is not None
        return f"({self.of.promql()}) / ({self.per.promql()})"

    def _matches(self, labels: tuple[tuple[str, str], ...]) -> bool:
        have = dict(labels)
        return all(have.get(k) != v[1:] if v.startswith("!") else have.get(k) == v for k, v in self.where)

    def _sum(self, sample: Sample, metric: str) -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for (name, labels), value in sample.items():
            if name == metric and self._matches(labels):
                key = tuple(dict(labels).get(b, "") for b in self.by)
                out[key] = out.get(key, 0.0) + value
        return out

    def evaluate(self, series: list[tuple[float, Sample]], i: int) -> dict[tuple[str, ...], float]:
        """The value at scrape ``i`` of ``series`` ((time, sample) pairs), by the ``by`` labels."""
        t, now = series[i]
        j = max((k for k, (tk, _) in enumerate(series) if tk <= t - RATE_WINDOW_S), default=0)
        t0, then = series[j]
        if self.kind == "gauge":
            return self._sum(now, self.metric)
        if self.kind == "rate":
            a, b = self._sum(then, self.metric), self._sum(now, self.metric)
            return {k: (v - a.get(k, 0.0)) / (t - t0) for k, v in b.items()} if t > t0 else {}
        if self.kind == "quantile":
            return self._quantile(then, now)
        assert self.of is not None and self.per is not None
        num, den = self.of.evaluate(series, i), self.per.evaluate(series, i)
        return {k: v / den[k] for k, v in num.items() if den.get(k)}

    def _quantile(self, then: Sample, now: Sample) -> dict[tuple[str, ...], float]:
        buckets: dict[tuple[str, ...], list[tuple[float, float]]] = {}
        for (name, labels), value in now.items():
            if name == f"{self.metric}_bucket" and self._matches(labels):
                have = dict(labels)
                key = tuple(have.get(b, "") for b in self.by)
                old = then.get((name, labels), 0.0)
                buckets.setdefault(key, []).append((float(have["le"]), value - old))
        out = {}
        for key, bs in buckets.items():
            bs.sort()
            total = bs[-1][1] if bs else 0.0
            if total <= 0:
                continue
            rank, below, lower = self.q * total, 0.0, 0.0
            for le, count in bs:
                if count >= rank:
                    upper = le if le != float("inf") else lower
                    out[key] = lower + (upper - lower) * (rank - below) / max(count - below, 1e-12)
                    break
                below, lower = count, le
        return out


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    queries: tuple[Query, ...] = field(default_factory=tuple)


def _success(**kw: Any) -> Query:
    return Query("rate", "infer_model_inference_success_total", **kw)


PANELS = (
    Panel("Throughput (images/s, by status)", "reqps", (Query("rate", "infer_images_total", by=("code",)),)),
    Panel("Stage time p99 (s)", "s", (Query("quantile", "infer_stage_seconds", by=("stage",), q=0.99),)),
    Panel("Queue wait p50 / p99 (s)", "s", (
        Query("quantile", "infer_stage_seconds", where=(("stage", "queue"),), q=0.5, legend="p50"),
        Query("quantile", "infer_stage_seconds", where=(("stage", "queue"),), q=0.99, legend="p99"),
    )),  # fmt: skip
    Panel("Errors (images/s, by status)", "reqps",
          (Query("rate", "infer_images_total", by=("code",), where=(("code", "!OK"),)),)),  # fmt: skip
    Panel("Answered by model version (images/s)", "reqps", (_success(by=("model", "version")),)),
    Panel("Compute per image by version (s)", "s", (Query(
        "ratio", of=Query("rate", "infer_model_compute_seconds_total", by=("model", "version")),
        per=_success(by=("model", "version"))),)),  # fmt: skip
    Panel("Versions in service", "none", (Query("gauge", "infer_model_version", by=("model", "version", "role")),)),
    Panel("Shadow agreement (share)", "percentunit", (
        Query("ratio", of=Query("rate", "infer_shadow_labels_agree_total"),
              per=Query("rate", "infer_shadow_matched_total"), legend="detection labels"),
        Query("ratio", of=Query("rate", "infer_shadow_attributes_agree_total"),
              per=Query("rate", "infer_shadow_attributes_compared_total"), legend="attributes"),
    )),  # fmt: skip
    Panel("Drift (PSI by statistic; flag over 0.25)", "none", (Query("gauge", "infer_drift_psi", by=("statistic",)),)),
    Panel("In flight (images)", "none", (Query("gauge", "infer_inflight_images"),)),
)


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON (schema 39; a Prometheus data source chosen at import)."""
    source = {"type": "prometheus", "uid": "${datasource}"}
    panels = []
    for n, panel in enumerate(PANELS):
        targets = [{"datasource": source, "expr": q.promql(), "legendFormat": q.legend or
                    " ".join(f"{{{{{b}}}}}" for b in q.by) or panel.title, "refId": chr(65 + k)}  # fmt: skip
                   for k, q in enumerate(panel.queries)]
        grid = {"h": 8, "w": 12, "x": 12 * (n % 2), "y": 8 * (n // 2)}
        units = {"defaults": {"unit": panel.unit}, "overrides": []}
        panels.append({"id": n + 1, "type": "timeseries", "title": panel.title, "datasource": source, "gridPos": grid,
                       "fieldConfig": units, "targets": targets})  # fmt: skip
    variable = {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus"}
    return {"title": "infer-server", "uid": "infer-server", "schemaVersion": 39, "version": 1, "editable": True,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "10s", "tags": ["inference"],
            "templating": {"list": [variable]}, "panels": panels}  # fmt: skip


def main(
    json_out: Annotated[Path, typer.Option("--json", help="Write the dashboard JSON here.")],
    png: Annotated[Path | None, typer.Option(help="Also record a server's life and draw the panels here.")] = None,
) -> None:
    """Write the dashboard JSON; with --png, record a server and draw what the dashboard shows."""
    json_out.write_text(json.dumps(dashboard(), indent=1) + "\n")
    print(f"wrote {json_out}")
    if png is not None:
        from benchmarks.dashboard_record import record, render

        render(record(), png)
        print(f"wrote {png}")


if __name__ == "__main__":
    typer.run(main)
