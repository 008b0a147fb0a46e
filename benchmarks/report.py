"""What a benchmark run found: records, the four targets, rich tables, the JSON file and the plots.

Used by ``benchmarks.fps`` once every point was measured; pure functions of the collected data
(nothing here talks to a server). The JSON file has at least::

    {"machine": {...}, "bounds": {"model_only_fps", "decode_fps", "cpu_bound_fps", ...},
     "runs": [{"config", "transport", "null_model", "concurrency", "fps", "p50_ms", "p95_ms",
               "p99_ms", "ratio_to_bound", ...}], "servers": {...}, "targets": [...]}

``p50_ms``/``p95_ms``/``p99_ms`` are per batch (push → last result); ``image_p*_ms`` per image.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from benchmarks.loadgen import PointResult

MEMORY_LIMIT_MB = 2e9 / 2**20  # "2 GB", read strictly as 2·10⁹ bytes
NOT_MEASURED = "not measured in this run (a phase not asked for, or failed: see above)"
OTHER_LIMIT = 0.15  # cores other processes may take during a point before its numbers are suspect


@dataclass
class RunRecord:
    config: str
    transport: str
    null_model: bool
    concurrency: int
    mode: str  # closed loop, or paced at offered_fps
    offered_fps: float | None
    fps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    image_p50_ms: float
    image_p95_ms: float
    image_p99_ms: float
    ratio_to_bound: float | None
    stable: bool
    windows_fps: list[float]
    images: int
    errors: int
    failure: str
    cpu_ms_per_image: dict[str, float]
    cpu_utilisation: float
    other_cores: float
    stage_ms: dict[str, float]
    labels_per_image: dict[str, float]
    round_index: int = 0  # 0: a point of the concurrency sweep; 1, 2, ...: an interleaved round (fps.Bench.rounds)
    batch_ms: list[float] = field(repr=False, default_factory=list)  # for the plots; not in the JSON

    @classmethod
    def of(cls, point: PointResult, config: str, transport: str, null_model: bool, round_index: int = 0) -> RunRecord:
        return cls(
            config=config, transport=transport, null_model=null_model, concurrency=point.concurrency,
            mode=point.mode, offered_fps=point.offered_fps, fps=point.fps,
            p50_ms=point.percentile("batch", 50), p95_ms=point.percentile("batch", 95),
            p99_ms=point.percentile("batch", 99), image_p50_ms=point.percentile("image", 50),
            image_p95_ms=point.percentile("image", 95), image_p99_ms=point.percentile("image", 99),
            ratio_to_bound=None, stable=point.stable, windows_fps=point.windows_fps, images=point.images,
            errors=point.errors, failure=point.failure, cpu_ms_per_image=point.cpu_ms_per_image,
            cpu_utilisation=point.cpu_utilisation, other_cores=point.other_cores,
            stage_ms=point.stage_ms, labels_per_image=point.labels_per_image, round_index=round_index,
            batch_ms=point.batch_ms.tolist(),
        )  # fmt: skip

    @property
    def swept(self) -> bool:
        """A closed-loop point of the concurrency sweep (not paced, not a round)."""
        return self.mode == "closed" and self.round_index == 0

    @property
    def load(self) -> str:
        if self.round_index:
            return f"round {self.round_index}"
        return "closed" if self.mode == "closed" else f"paced {self.offered_fps:.0f}/s"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["batch_ms"]
        return _rounded(out)


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    required: str
    passed: bool | None  # None: not measured in this run


def best(runs: list[RunRecord], transport: str, null_model: bool) -> RunRecord | None:
    """The transport's fastest point of the concurrency sweep."""
    swept = [r for r in runs if r.transport == transport and r.null_model == null_model and r.swept]
    return max(swept, key=lambda r: r.fps, default=None)


def round_ratios(runs: list[RunRecord], a: str, b: str) -> list[float]:
    """fps of ``a`` / fps of ``b`` in each interleaved null-model round that measured both."""
    rounds: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.null_model and r.round_index:
            rounds.setdefault(r.round_index, {})[r.transport] = r.fps
    return [v[a] / v[b] for _, v in sorted(rounds.items()) if a in v and b in v and v[b] > 0]


def evaluate_targets(
    runs: list[RunRecord], bounds: dict[str, Any], servers: dict[str, dict[str, Any]], config: str
) -> list[Target]:
    targets = []
    top = best(runs, "tmpfs", False)
    cpu_bound = bounds.get("cpu_bound_fps")
    e2e = f"{config}, tmpfs: e2e ≥ 0.9 × CPU-time bound"
    if top and cpu_bound:
        ratio = top.fps / cpu_bound
        targets.append(
            Target(e2e, f"{top.fps:.1f} / {cpu_bound:.1f} img/s = {ratio:.2f} (K={top.concurrency})", "≥ 0.90",
                   ratio >= 0.9)  # fmt: skip
        )
    else:
        targets.append(Target(e2e, NOT_MEASURED, "≥ 0.90", None))
    null = {t: best(runs, t, True) for t in ("tmpfs", "inline", "rest")}
    for other, factor in (("inline", 4.0), ("rest", 10.0)):
        a, b = null["tmpfs"], null[other]
        if not (a and b):
            targets.append(Target(f"null model: tmpfs ≥ {factor:g}× {other}", NOT_MEASURED, f"≥ {factor:g}×", None))
            continue
        ratio = a.fps / b.fps
        measured = f"{a.fps:.0f} (K={a.concurrency}) / {b.fps:.0f} (K={b.concurrency}) = {ratio:.2f}×"
        per_round = round_ratios(runs, "tmpfs", other)
        if per_round:  # the sweep's ratio and one per round (each taken within a minute): their median
            values = [ratio, *per_round]
            ratio = float(np.median(values))
            measured = (f"median {ratio:.2f}× of the sweep's {measured} and {len(per_round)} interleaved "
                        f"rounds ({', '.join(f'{v:.2f}×' for v in per_round)})")  # fmt: skip
        targets.append(Target(f"null model: tmpfs ≥ {factor:g}× {other}", measured, f"≥ {factor:g}×", ratio >= factor))
    unloaded = next((r for r in runs if not r.null_model and r.transport == "tmpfs" and r.concurrency == 1
                     and r.mode == "closed"), None)  # fmt: skip
    paced = next((r for r in runs if r.mode == "paced" and not r.null_model), None)
    p99 = "p99 per batch at 50% of peak ≤ 2 × unloaded p99"
    if unloaded and paced:
        ratio = paced.p99_ms / unloaded.p99_ms
        targets.append(
            Target(p99, f"{paced.p99_ms:.0f} ms at {paced.fps:.1f} img/s / {unloaded.p99_ms:.0f} ms = {ratio:.2f}×",
                   "≤ 2.00×", ratio <= 2.0)  # fmt: skip
        )
    else:
        targets.append(Target(p99, NOT_MEASURED, "≤ 2.00×", None))
    model_server = servers.get("grpc")
    if not model_server:
        targets.append(Target(f"peak resident memory of the server ({config} models)", NOT_MEASURED,
                              f"≤ {MEMORY_LIMIT_MB:.0f} MiB (2 GB)", None))  # fmt: skip
    else:
        hwm = model_server["hwm_sum_mb"]
        targets.append(
            Target(
                f"peak resident memory of the server ({config} models)",
                f"{hwm:.0f} MiB Σ VmHWM ({model_server['peak_rss_mb']:.0f} MiB sampled Σ RSS)",
                f"≤ {MEMORY_LIMIT_MB:.0f} MiB (2 GB)" + ("" if config == "full" else ", default models only"),
                hwm <= MEMORY_LIMIT_MB if config == "full" else None,  # the target is for the default models
            )
        )
    return targets


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_rounded(v) for v in value]
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_rounded(document), indent=2) + "\n")


def _ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def print_report(console: Console, document: dict[str, Any], runs: list[RunRecord], targets: list[Target]) -> None:
    m = document["machine"]
    console.print(
        f"\n[bold]{m['cpu']}[/bold], {m['cores']} cores, {m['memory_gb']} GB RAM — {m['date']} — "
        f"models: {m['models']} ({m['models_kind']})"
    )
    for note in document.get("notes", []):
        console.print(f"[yellow]note:[/yellow] {note}")
    table = Table(title="Throughput and latency (batch = push → last result)", header_style="bold")
    for col in ("config", "transport", "path", "K", "load", "img/s", "×bound", "batch p50", "p95", "p99",
                "image p50", "p99", "CPU ms/img front/workers/client", "cores used", "other", "stable"):  # fmt: skip
        table.add_column(col, justify="left" if col in ("config", "transport", "path", "load") else "right")
    for r in runs:
        cpu = r.cpu_ms_per_image
        table.add_row(
            r.config, r.transport, "null model" if r.null_model else "models", str(r.concurrency),
            r.load, f"{r.fps:.1f}",
            "-" if r.ratio_to_bound is None else f"{r.ratio_to_bound:.2f}",
            _ms(r.p50_ms), _ms(r.p95_ms), _ms(r.p99_ms), _ms(r.image_p50_ms), _ms(r.image_p99_ms),
            " / ".join(f"{cpu[k]:.2f}" if k in cpu else "-" for k in ("front", "workers", "client")),
            f"{r.cpu_utilisation:.2f}", f"{r.other_cores:.2f}" if r.other_cores < OTHER_LIMIT
            else f"[red]{r.other_cores:.2f}[/red]", "yes" if r.stable else "[yellow]no[/yellow]",
        )  # fmt: skip
    console.print(table)

    b = document["bounds"]
    if b:
        bt = Table(title=f"Bounds of this machine ({document['config']}, measured in this run)", header_style="bold")
        bt.add_column("bound")
        bt.add_column("img/s", justify="right")
        bt.add_column("how", justify="left")
        bt.add_row("decode only (DALI)", f"{b['decode_fps']:.1f}", "DetectorPreprocessor on every core")
        if b.get("model_only_fps"):
            bt.add_row("model only", f"{b['model_only_fps']:.1f}", "engines on pre-decoded tensors, every core")
        if b.get("cpu_bound_fps"):
            stages = ", ".join(f"{k} {v:.1f}" for k, v in b["stage_ms_per_image"].items())
            bt.add_row(
                "CPU-time bound",
                f"{b['cpu_bound_fps']:.1f}",
                f"{m['cores']} cores / {b['cpu_ms_per_image']:.1f} ms per image ({b['cpu_cost_from']}, {b['basis']}); "
                f"stages: {stages}; workers' CPU {b['workers_cpu_ms_per_image'] or float('nan'):.1f}",
            )
            bt.add_row(
                "  same, unloaded",
                f"{b['cpu_bound_fps_unloaded']:.1f}",
                "from the one-client run's stage timings (other minutes: this VM's core speed drifts)",
            )
        console.print(bt)

    st = Table(title="Server memory (all processes together, from /proc)", header_style="bold")
    for col in ("server", "processes", "Σ VmHWM MiB", "peak Σ RSS MiB", "Σ PSS MiB (end)"):
        st.add_column(col, justify="left" if col == "server" else "right")
    for name, mem in document["servers"].items():
        st.add_row(name, str(mem["processes"]), f"{mem['hwm_sum_mb']:.0f}", f"{mem['peak_rss_mb']:.0f}",
                   f"{mem['pss_now_mb']:.0f}")  # fmt: skip
    console.print(st)

    if document.get("failed"):
        ft = Table(title="Points and phases that failed (the run went on)", header_style="bold")
        ft.add_column("what")
        ft.add_column("reason")
        for f in document["failed"]:
            ft.add_row(f["what"], f["reason"])
        console.print(ft)

    tt = Table(title="Targets", header_style="bold")
    for col in ("target", "measured", "required", ""):
        tt.add_column(col)
    for t in targets:
        mark = "-" if t.passed is None else "[green]PASS[/green]" if t.passed else "[red]MISS[/red]"
        tt.add_row(t.name, t.measured, t.required, mark)
    console.print(tt)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    fig.clf()  # pyplot keeps figures alive until closed; write_plots closes them all at the end
    return path


def write_plots(directory: Path, runs: list[RunRecord], bounds: dict[str, Any], config: str) -> list[Path]:
    """fps vs concurrency per transport (models | null model), and the batch-latency distributions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    colours = {"tmpfs": "tab:green", "inline": "tab:blue", "rest": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    for ax, null in zip(axes, (False, True), strict=True):
        for transport, colour in colours.items():
            pts = sorted((r.concurrency, r.fps) for r in runs
                         if r.transport == transport and r.null_model == null and r.swept)  # fmt: skip
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", color=colour, label=transport)
        if not null:
            for key, style, label in (("cpu_bound_fps", "--", "CPU-time bound"), ("model_only_fps", ":", "model only"),
                                      ("decode_fps", "-.", "decode only")):  # fmt: skip
                if bounds.get(key):
                    ax.axhline(bounds[key], color="grey", linestyle=style, linewidth=1, label=label)
        ax.set_xscale("log", base=2)
        levels = sorted({r.concurrency for r in runs if r.null_model == null and r.swept})
        if levels:
            ax.set_xticks(levels, [str(k) for k in levels])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("images/s")
        ax.set_title(f"{config}: models" if not null else "null model (data path only)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fps_path = _save(fig, directory / "fps_vs_concurrency.png")

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=80)
    for r in runs:
        if r.null_model or r.transport != "tmpfs" or not r.batch_ms:
            continue
        values = np.sort(np.asarray(r.batch_ms))
        label = f"K={r.concurrency}" if r.mode == "closed" else f"paced at {r.offered_fps:.0f} img/s (50% of peak)"
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=label,
                linestyle="-" if r.mode == "closed" else "--")  # fmt: skip
    ax.axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("batch latency, ms (push → last result)")
    ax.set_ylabel("fraction of batches")
    ax.set_title(f"{config}, tmpfs: batch latency distribution")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    latency_path = _save(fig, directory / "latency.png")
    plt.close("all")
    return [fps_path, latency_path]
