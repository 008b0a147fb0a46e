"""The fps benchmark: images/s of the whole server, how close to this machine's bound, and what tmpfs buys.

Run from the repository root (``make bench`` does the first)::

    .venv/bin/python -m benchmarks.fps --json bench.json --plot plots/     # about 4-5 minutes
    .venv/bin/python -m benchmarks.fps --quick                             # under a minute
    .venv/bin/python -m benchmarks.fps --config seed4                      # 4 ResNet classifiers per box

One run, in this order, so that nothing else competes for the cores while a number is taken:

1. Workload: fixed-seed 1280×720 scenes from ``engines.scenes``, pushed in batches of ``--batch``.
2. Bounds (``benchmarks.bounds``), no server running: decode-only (DALI) and model-only (engines on
   pre-decoded tensors) throughput on every core.
3. The server on the configuration's models (``benchmarks.servers``: ``python -m infer_server serve
   --port 0``, a fresh shared directory under /dev/shm): closed-loop sweeps over the concurrency
   (``benchmarks.loadgen``: K real ``InferClient``s, windows until three agree within 10%) for the
   ``tmpfs`` (PushData path) and ``inline`` (PushData data) transports, then an open-loop run at 50%
   of the peak rate. The saturated tmpfs point gives the per-stage CPU cost → the CPU-time bound.
   Then the REST/JSON baseline (``benchmarks/baselines``) on the same models.
4. The same servers with ``--null-model`` (read + header check, no inference): the data path alone;
   both stay up for interleaved rounds of the transports at their best concurrency (``Bench.rounds``).
5. Report (``benchmarks.report``): tables on stdout, ``--json``, ``--plot``, and the four targets.

``--server ADDR`` measures a server that is already running instead (gRPC transports only; no
memory, null-model or REST runs).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import platform
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

if __package__ in (None, ""):  # run as a script: make the repository importable as the module would be
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import typer
from rich.console import Console

from benchmarks import bounds as bounds_mod
from benchmarks import servers
from benchmarks.loadgen import Workload, make_workload, run_point
from benchmarks.report import OTHER_LIMIT, RunRecord, best, evaluate_targets, print_report, write_json, write_plots
from benchmarks.repos import CONFIGS, assemble
from benchmarks.servers import REPO_ROOT, ServerProcess, grpc_server, rest_server

TRANSPORTS = ("tmpfs", "inline", "rest")
TRAINED = REPO_ROOT / "engines" / "models"
PLACEHOLDER = REPO_ROOT / "engines" / "work" / "placeholder_models"
DEFAULT_CACHE = Path.home() / ".cache" / "infer-server-bench"
log = Console(stderr=True)


@dataclass(frozen=True)
class Plan:
    """How long and how wide each phase runs."""

    concurrency: tuple[int, ...] = (1, 2, 4, 8)  # tmpfs with the models
    # inline and REST with the models: compute-bound like tmpfs, a saturated point is what they add
    other_concurrency: tuple[int, ...] = (4,)
    null_concurrency: tuple[int, ...] = (1, 4, 16)  # tmpfs with the null model
    null_other_concurrency: tuple[int, ...] = (4, 16)  # inline and REST: their best points are at high K
    null_rounds: int = 5  # interleaved rounds of the transports at their best K (the data-path ratios)
    round_window_s: float = 0.5  # rounds: many short points rather than a few long ones (see Bench.rounds)
    round_max_s: float = 3.0
    window_s: float = 2.0  # shortest window; stretched to hold ``batches_per_window`` batches
    max_window_s: float = 5.0
    batches_per_window: int = 10
    max_s: float = 20.0
    warmup_s: float = 1.5
    null_window_s: float = 1.0
    null_max_s: float = 6.0
    null_warmup_s: float = 0.5
    latency_min_s: float = 10.0  # the unloaded and the 50%-load runs: enough batches for a p99
    bounds_s: float = 3.0
    rest_models: bool = True  # the REST baseline with the models too, not only the null model
    scenes: int = 48

    def levels(self, transport: str, null_model: bool) -> tuple[int, ...]:
        if null_model:
            return self.null_concurrency if transport == "tmpfs" else self.null_other_concurrency
        return self.concurrency if transport == "tmpfs" else self.other_concurrency


QUICK = Plan(
    concurrency=(1, 4), other_concurrency=(4,), null_concurrency=(4,), null_other_concurrency=(4,), window_s=1.0,
    max_window_s=2.0, batches_per_window=4, max_s=6.0, warmup_s=1.0, null_window_s=0.5, null_max_s=2.5,
    null_warmup_s=0.3, latency_min_s=3.0, bounds_s=1.5, rest_models=False, scenes=24, null_rounds=0,
)  # fmt: skip


def machine_info(models: Path) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import grpc
    import onnxruntime
    from nvidia import dali

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "dali": dali.__version__,
        "grpc": grpc.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "models": str(models),
        "models_kind": "trained" if models.resolve() == TRAINED.resolve() else "NOT the trained models",
        "device": "cpu",
    }


class Bench:
    """One benchmark run: collects records while the phases run."""

    def __init__(self, config: str, plan: Plan, workload: Workload | None,
                 progress: Callable[[Bench], None] | None = None) -> None:  # fmt: skip
        self.config, self.plan, self.workload = config, plan, workload
        self.runs: list[RunRecord] = []
        self.failed: list[dict[str, Any]] = []  # points and phases that could not start or finish, with why
        self.servers: dict[str, dict[str, Any]] = {}
        self._progress = progress  # called after every point, so what was measured is saved at once

    def measure(self, transport: str, null_model: bool, concurrency: int, round_index: int = 0,
                **point: Any) -> bool:  # fmt: skip
        """One point (``loadgen.run_point``); a point that cannot start or finish — clients that do not
        start on a loaded machine, a client that dies — is recorded as failed and the run goes on."""
        assert self.workload is not None
        try:
            result = run_point(self.workload, transport, concurrency=concurrency, **point)
        except Exception as exc:  # noqa: BLE001 - any failure of one point is that point's result
            load = f"round {round_index}" if round_index else ("paced" if point.get("rate_images") else "closed")
            self.fail(f"{transport} {'null ' if null_model else ''}K={concurrency} {load}", exc)
            return False
        self._add(result, transport, null_model, round_index)
        return True

    def fail(self, what: str, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        self.failed.append({"what": what, "reason": reason})
        log.print(f"  [red]{what}: failed ({reason}); the run goes on[/red]")
        self._saved()

    def _saved(self) -> None:
        if self._progress is not None:
            self._progress(self)

    def sweep(
        self, server: ServerProcess | None, address: str, shm_dir: str, transport: str, null_model: bool,
        levels: tuple[int, ...], paced: bool = False,
    ) -> None:  # fmt: skip
        p = self.plan
        window, max_s, warmup = (
            (p.null_window_s, p.null_max_s, p.null_warmup_s) if null_model else (p.window_s, p.max_s, p.warmup_s)
        )
        for k in levels:
            unloaded = k == 1 and not null_model and transport == "tmpfs"
            self.measure(
                transport, null_model, k, address=address, shm_dir=shm_dir, window_s=window, warmup_s=warmup,
                max_s=max(max_s, p.latency_min_s) if unloaded else max_s, min_s=p.latency_min_s if unloaded else 0.0,
                accounting=_accounting(server), batches_per_window=p.batches_per_window, max_window_s=p.max_window_s,
            )  # fmt: skip
        if paced:
            top = best(self.runs, transport, null_model)
            k = max(max(levels), 4)  # enough connections that the schedule is never waiting on one
            if top is None:
                self.fail(f"{transport} K={k} paced", RuntimeError("no closed-loop point to take 50% of"))
                return
            self.measure(
                transport, null_model, k, address=address, shm_dir=shm_dir, window_s=window, warmup_s=warmup,
                max_s=max(max_s, p.latency_min_s), min_s=p.latency_min_s, accounting=_accounting(server),
                rate_images=0.5 * top.fps, batches_per_window=p.batches_per_window, max_window_s=p.max_window_s,
            )  # fmt: skip

    def rounds(self, endpoints: dict[str, ServerProcess], count: int) -> None:
        """``count`` rounds of one null-model point per transport at its best concurrency of the sweep,
        back to back, the order rotated per round: this VM's speed drifts by ±15% over minutes (and
        by more within seconds now and then), so a ratio between transports is taken within a round
        of a few seconds, and ``report`` judges the median over the rounds and the sweep."""
        p = self.plan
        order = [t for t in endpoints if best(self.runs, t, True) is not None]
        if not order:
            return
        for i in range(count):
            for t in order[i % len(order) :] + order[: i % len(order)]:
                top = best(self.runs, t, True)
                assert top is not None
                srv = endpoints[t]
                self.measure(
                    t, True, top.concurrency, round_index=i + 1, address=srv.address,
                    shm_dir=str(srv.shm_dir) if t != "rest" else "", window_s=p.round_window_s,
                    warmup_s=p.null_warmup_s, max_s=p.round_max_s, accounting=_accounting(srv),
                    batches_per_window=p.batches_per_window, max_window_s=p.round_max_s / 3,
                )  # fmt: skip

    def _add(self, point: Any, transport: str, null_model: bool, round_index: int = 0) -> None:
        record = RunRecord.of(point, self.config, transport, null_model, round_index)
        self.runs.append(record)
        load = record.load
        log.print(
            f"  {transport:6} {'null ' if null_model else ''}K={record.concurrency:<3} {load}: "
            f"{record.fps:8.1f} img/s, batch p99 {record.p99_ms:7.1f} ms"
            + ("" if record.stable else "  [yellow](not stable within the time limit)[/yellow]")
        )
        self._saved()


def _accounting(server: ServerProcess | None) -> Callable[[], dict[str, float]]:
    def read() -> dict[str, float]:
        if server is None:  # an external server: its processes are not known, its CPU shows as "other"
            return {}
        front, workers = server.cpu()
        return {"front": front, "workers": workers}

    return read


@contextlib.contextmanager
def _phase(title: str) -> Iterator[None]:
    log.rule(f"[bold]{title}")
    yield


def run(
    config: str, transports: tuple[str, ...], data_paths: tuple[bool, ...], plan: Plan, batch: int, workers: int,
    models: Path, server: str | None, shm_dir: Path, cache_dir: Path, seed4_int8: bool,
    json_out: Path | None = None,
) -> tuple[dict[str, Any], list[RunRecord]]:  # fmt: skip
    """Every phase in order (module docstring); returns the JSON document (without runs) and the runs.

    Nothing that goes wrong ends the run: a point or a phase (a server that does not start, the bounds)
    that fails is recorded in ``failed`` with its reason and the next one runs. With ``json_out`` the
    document is rewritten after every point (``"finished": false`` until the end), so a run that is
    killed still leaves what it measured."""
    machine = machine_info(models)
    notes: list[str] = []
    if machine["models_kind"] != "trained":
        notes.append(f"models from {models}: not the trained repository (engines/models), speeds differ")
    if machine["load_average_at_start"] > 0.5 * machine["cores"]:
        notes.append(f"the machine was busy at start (load average {machine['load_average_at_start']})")

    def document(bench: Bench, bounds: dict[str, Any], finished: bool) -> dict[str, Any]:
        return {
            "machine": machine, "config": config, "models": list(models_in_run), "batch": batch, "workers": workers,
            "mean_image_kb": round(bench.workload.mean_image_bytes / 1024, 1) if bench.workload else None,
            "bounds": bounds, "servers": bench.servers, "notes": notes, "failed": bench.failed, "finished": finished,
        }  # fmt: skip

    def save_progress(bench: Bench) -> None:
        if json_out is not None:
            write_json(json_out, document(bench, {}, False) | {"runs": [r.to_json() for r in bench.runs]})

    models_in_run: list[str] = []
    bench = Bench(config, plan, None, progress=save_progress)
    measured = None
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        try:
            with _phase(f"workload: {plan.scenes} scenes 1280×720, batches of {batch}"):
                bench.workload = make_workload(plan.scenes, batch, Path(tmp))
            (Path(tmp) / "repo").mkdir()
            repo = assemble(config, models, Path(tmp) / "repo", cache_dir=cache_dir, int8=seed4_int8)
            models_in_run += repo.models
            if repo.note:
                notes.append(repo.note)
        except Exception as exc:  # noqa: BLE001 - nothing can be measured; the report still says why
            bench.fail("workload and model repository", exc)
        else:
            if False in data_paths:
                measured = _measure_bounds(bench, repo.path, machine["cores"], batch)
            for null_model in data_paths:
                what = "null model (data path only)" if null_model else f"models: {config}"
                try:
                    _serve_and_measure(bench, transports, null_model, what, repo.path, server, shm_dir, workers,
                                       batch)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - e.g. a server that did not start: the next phase runs
                    bench.fail(what, exc)
    bound_values: dict[str, Any] = {}
    if measured is not None:
        bound_values = _bounds(measured, bench.runs, machine["cores"])
        for r in bench.runs:
            if not r.null_model and bound_values.get("cpu_bound_fps"):
                r.ratio_to_bound = r.fps / bound_values["cpu_bound_fps"]
    notes += [f"{r.transport} K={r.concurrency}: {r.errors} images answered with an error {r.failure}".rstrip()
              for r in bench.runs if r.errors]  # fmt: skip
    busy = [r for r in bench.runs if r.other_cores >= OTHER_LIMIT]
    if server is not None:
        notes.append(f"external server {server}: its CPU is not attributed (it is in the 'other' column)")
    elif busy:
        worst = max(busy, key=lambda r: r.other_cores)
        notes.append(
            f"other processes took CPU during {len(busy)} of {len(bench.runs)} points (up to {worst.other_cores:.2f} "
            "cores): those numbers are low and ratios between them unreliable; rerun on a quiet machine"
        )
    return document(bench, bound_values, True), bench.runs


def _measure_bounds(bench: Bench, repo: Path, cores: int, batch: int) -> bounds_mod.Bounds | None:
    assert bench.workload is not None
    try:
        with _phase(f"bounds: decode-only and model-only on {cores} cores"):
            measured = bounds_mod.measure_bounds(repo, bench.workload.images, cores=cores, batch=batch,
                                                 seconds=bench.plan.bounds_s)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the run goes on without the CPU-time bound
        bench.fail("bounds", exc)
        return None
    log.print(f"  decode only {measured.decode_fps:.1f} img/s; detector "
              f"{measured.detector_ms_per_image:.2f} ms/img; classifiers (ms/crop) "
              f"{ {k: round(v, 2) for k, v in measured.classifier_ms_per_crop.items()} }")  # fmt: skip
    return measured


def _serve_and_measure(
    bench: Bench, transports: tuple[str, ...], null_model: bool, what: str, repo: Path, server: str | None,
    shm_dir: Path, workers: int, batch: int,
) -> None:  # fmt: skip
    """One data path (models or null model): its servers, sweeps and interleaved rounds."""
    plan = bench.plan
    grpc_transports = tuple(t for t in transports if t != "rest")
    if server is not None:
        with _phase(f"external server {server}: {what}"):
            for t in grpc_transports:
                bench.sweep(None, server, str(shm_dir), t, null_model, plan.levels(t, null_model), paced=t == "tmpfs")
        return
    rest = "rest" in transports and (null_model or plan.rest_models)
    # Interleaved rounds need every server of the comparison up at once; the model servers
    # (1.5 GB each) run one after the other.
    compared = "tmpfs" in transports and len(set(transports)) > 1  # what the data-path targets need
    rounds = plan.null_rounds if null_model and compared else 0
    with contextlib.ExitStack() as open_servers:
        endpoints: dict[str, ServerProcess] = {}
        if grpc_transports:
            log.rule(f"[bold]gRPC server, {what}")
            srv = open_servers.enter_context(
                grpc_server(repo, workers=workers, batch_size=batch, null_model=null_model)
            )
            for t in grpc_transports:
                paced = t == "tmpfs" and not null_model
                bench.sweep(srv, srv.address, str(srv.shm_dir), t, null_model, plan.levels(t, null_model), paced=paced)
                endpoints[t] = srv
            if not rounds:  # done with it: read its memory, stop it
                bench.servers["grpc-null" if null_model else "grpc"] = srv.memory()
                open_servers.close()
                endpoints.clear()
        if rest:
            log.rule(f"[bold]REST baseline, {what}")
            try:
                srv = open_servers.enter_context(
                    rest_server(repo, workers=workers, batch_size=batch, null_model=null_model)
                )
            except Exception as exc:  # noqa: BLE001 - the gRPC rounds still run without REST
                bench.fail(f"REST baseline, {what}", exc)
            else:
                bench.sweep(srv, srv.address, "", "rest", null_model, plan.levels("rest", null_model))
                endpoints["rest"] = srv
        if rounds:
            log.rule(f"[bold]{what}: {rounds} interleaved rounds at each transport's best concurrency")
            bench.rounds(endpoints, rounds)
        for t, srv in endpoints.items():  # the servers still up
            name = "rest" if t == "rest" else "grpc"
            bench.servers[f"{name}-null" if null_model else name] = srv.memory()


def _bounds(measured: bounds_mod.Bounds, runs: list[RunRecord], cores: int) -> dict[str, Any]:
    """The three bounds. The CPU-time bound comes from the saturated tmpfs point, the one the e2e
    target is judged on: same windows, same clock speed of this VM (which varies by ±15% over
    minutes), every core busy; the one-client run's value is kept for reference."""
    model_runs = [r for r in runs if not r.null_model and r.mode == "closed"]
    tmpfs = [r for r in model_runs if r.transport == "tmpfs"] or model_runs
    saturated = max(tmpfs, key=lambda r: r.fps, default=None)
    unloaded = min(tmpfs, key=lambda r: r.concurrency, default=None)
    out: dict[str, Any] = {
        "decode_fps": measured.decode_fps,
        "detector_ms_per_image": measured.detector_ms_per_image,
        "classifier_ms_per_crop": measured.classifier_ms_per_crop,
        "model_only_fps": None,
        "cpu_bound_fps": None,
        "cores": cores,
    }
    if saturated is None or unloaded is None:
        return out
    bound = bounds_mod.cpu_bound(saturated.stage_ms, saturated.cpu_ms_per_image.get("workers"), cores)
    reference = bounds_mod.cpu_bound(unloaded.stage_ms, None, cores)
    return out | {
        "model_only_fps": bounds_mod.model_only_fps(measured, saturated.labels_per_image),
        "cpu_bound_fps": bound.fps,
        "cpu_ms_per_image": bound.cost_ms,
        "cpu_cost_from": bound.source,
        "stage_ms_per_image": bound.stages,
        "workers_cpu_ms_per_image": saturated.cpu_ms_per_image.get("workers"),
        "basis": f"{saturated.transport} K={saturated.concurrency}",
        "cpu_bound_fps_unloaded": reference.fps,
        "stage_ms_per_image_unloaded": reference.stages,
        "detections_per_image": saturated.labels_per_image,
        "crops_per_image": bounds_mod.crops_per_image(measured, saturated.labels_per_image),
    }


app = typer.Typer(add_completion=False, help=__doc__.split("\n\n")[0])


def _use_tokens() -> None:
    """Authentication on for this run: a private tokens file for the servers started here (their
    ``--tokens-file``) and its token for the clients (``INFER_TOKEN``, read by ``Credentials.from_env``)."""
    folder = Path(tempfile.mkdtemp(prefix="infer-bench-tokens-"))
    token = secrets.token_urlsafe(32)
    path = folder / "tokens"
    path.write_text(f"bench {token}\n")
    path.chmod(0o600)
    atexit.register(shutil.rmtree, folder, True)
    servers.GRPC_SERVER_ARGS.extend(["--tokens-file", str(path)])
    os.environ["INFER_TOKEN"] = token


def _levels(text: str) -> tuple[int, ...]:
    return tuple(sorted({int(v) for v in text.split(",")}))


@app.command()
def main(
    config: Annotated[str, typer.Option(help=f"Model configuration: {', '.join(CONFIGS)}.")] = "full",
    transport: Annotated[list[str] | None, typer.Option(help="tmpfs, inline, rest (repeatable; default all).")] = None,
    null_model: Annotated[
        bool | None,
        typer.Option(
            "--null-model/--no-null-model", help="Only the null-model runs / no null-model runs (default: both)."
        ),
    ] = None,  # fmt: skip
    concurrency: Annotated[str | None, typer.Option(help="Clients per point with models, e.g. 1,2,4,8.")] = None,
    null_concurrency: Annotated[str | None, typer.Option(help="Clients per null-model point, e.g. 1,4,16.")] = None,
    batch: Annotated[int, typer.Option(help="Images per push (also the server's --batch-size).")] = 8,
    workers: Annotated[int, typer.Option(help="Stage workers (default: one per core).")] = 0,
    quick: Annotated[bool, typer.Option(help="Fewer, shorter points: under a minute.")] = False,
    server: Annotated[str | None, typer.Option(help="Measure this running server (HOST:PORT) instead.")] = None,
    shm_dir: Annotated[Path, typer.Option(help="With --server: its shared directory.")] = Path("/dev/shm/infer"),
    models: Annotated[Path | None, typer.Option(help="Source model repository (default engines/models).")] = None,
    seed4_fp32: Annotated[bool, typer.Option(help="seed4: run the classifiers in FP32, not INT8.")] = False,
    cache_dir: Annotated[Path, typer.Option(help="Where seed4's classifiers are cached.")] = DEFAULT_CACHE,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write PNG plots into this directory.")] = None,
    tokens: Annotated[
        bool, typer.Option(help="Serve with a tokens file; every client call carries a bearer token.")
    ] = False,
    pin_workers: Annotated[bool, typer.Option(help="Serve with --pin-workers (each worker on its own CPU).")] = False,
) -> None:
    """Measure images/s, latency, bounds and transports of the inference server."""
    if tokens:
        _use_tokens()
    if pin_workers:
        servers.GRPC_SERVER_ARGS.append("--pin-workers")
    transports = tuple(transport or TRANSPORTS)
    if config not in CONFIGS or not set(transports) <= set(TRANSPORTS):
        raise typer.BadParameter(f"--config is one of {CONFIGS}; --transport of {TRANSPORTS}")
    plan = QUICK if quick else Plan()
    if concurrency:
        plan = replace(plan, concurrency=_levels(concurrency), other_concurrency=_levels(concurrency))
    if null_concurrency:
        levels = _levels(null_concurrency)
        plan = replace(plan, null_concurrency=levels, null_other_concurrency=levels)
    if models is None:
        models = TRAINED if (TRAINED / "detector" / "config.yaml").is_file() else PLACEHOLDER
    data_paths = (False, True) if null_model is None else (bool(null_model),)
    if server is not None:
        data_paths = (False,)
    cores = len(os.sched_getaffinity(0))
    document, runs = run(config, transports, data_paths, plan, batch, workers or cores, models, server,
                         shm_dir, cache_dir, not seed4_fp32, json_out)  # fmt: skip
    targets = evaluate_targets(runs, document["bounds"], document["servers"], config)
    document["runs"] = [r.to_json() for r in runs]
    document["targets"] = [t.__dict__ for t in targets]
    # Redirected output (CI logs, README tables) gets wide tables instead of wrapped cells.
    print_report(Console(width=None if sys.stdout.isatty() else 200), document, runs, targets)
    if json_out is not None:
        write_json(json_out, document)
    if plot is not None:
        for path in write_plots(plot, runs, document["bounds"], config):
            log.print(f"plot: {path}")
    if document["failed"]:  # everything measured is reported and saved; the exit status says not all of it
        log.print(f"[red]{len(document['failed'])} point(s) or phase(s) failed: see the table above[/red]")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
