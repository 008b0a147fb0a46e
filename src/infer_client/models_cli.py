"""``infer-client models``: what serves, and changing it while the server runs (for operators).

``list`` shows every model of the server's repository (the version serving, the versions on disk,
an operator's pin, what ``rollback`` returns to, the candidate under trial and how far its shadow
runs agree, why the last change was refused); ``load``, ``unload``, ``rollback``, ``reload``,
``canary`` and ``shadow`` change it and show the result; ``drift`` shows the drift watch. A change returns once every
worker serves the new models. Exit status: 0 done, 2 refused or the call failed (the reason on
stderr). Credentials come from the environment, as for every command (``Credentials.from_env``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from infer_client import Credentials, InferClient, InferError, ModelAdmin, ModelInfo

T = TypeVar("T")
app = typer.Typer(no_args_is_help=True, help="List the server's models and change them while it runs.")

ServerOpt = Annotated[str, typer.Option("--server", "-s", help="Server address, e.g. localhost:8001.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per model.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds the call may take (a change waits for every worker).")]


def _call(server: str, timeout: float, call: Callable[[ModelAdmin], T]) -> T:
    """``call`` on a client of ``server``; a failed call is said on stderr and exits 2."""
    try:
        with InferClient(server, timeout=timeout, credentials=Credentials.from_env(), transport="inline") as client:
            return call(client.models)
    except InferError as exc:
        Console(stderr=True).print(f"[red]error[/red]: {exc}", highlight=False)
        raise typer.Exit(2) from None


def _run(server: str, timeout: float, as_json: bool, call: Callable[[ModelAdmin], list[ModelInfo]]) -> None:
    models = _call(server, timeout, call)
    if as_json:
        for model in models:
            print(json.dumps(asdict(model)))
        return
    table = Table(title_justify="left")
    for column in ("model", "kind", "state", "version", "on disk", "pinned", "previous", "trial", "last error"):
        table.add_column(column)
    for m in models:
        state = "[green]READY[/green]" if m.state == "READY" else f"[yellow]{m.state}[/yellow]"
        trial = ""
        if m.candidate:
            trial = f"v{m.candidate}: canary {m.canary_share:.0%}, shadow {m.shadow_share:.0%}"
            if m.shadow_images:
                trial += (f" ({m.shadow_images} images: detections {m.shadow_detection_agreement:.1%}, "
                          f"attributes {m.shadow_attribute_agreement:.1%} agree)")  # fmt: skip
        row = (m.name, m.kind, state, m.version, ", ".join(m.versions), m.pinned, m.previous, trial, m.last_error)
        table.add_row(*row)
    Console().print(table)


@app.command("list")
def list_models(server: ServerOpt = "localhost:8001", json_lines: JsonOpt = False, timeout: TimeoutOpt = 30.0) -> None:
    """Every model of the server's repository and its state."""
    _run(server, timeout, json_lines, lambda admin: admin.list())


@app.command()
def load(
    name: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="The version to serve (default: the one its policy picks).")] = "",
    server: ServerOpt = "localhost:8001",
    json_lines: JsonOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Serve VERSION of NAME (or load an unloaded attribute model back)."""
    _run(server, timeout, json_lines, lambda admin: admin.load(name, version))


@app.command()
def unload(
    name: Annotated[str, typer.Argument(help="The attribute model.")],
    server: ServerOpt = "localhost:8001",
    json_lines: JsonOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Stop running an attribute model (results no longer carry its attributes)."""
    _run(server, timeout, json_lines, lambda admin: admin.unload(name))


@app.command()
def rollback(
    name: Annotated[str, typer.Argument(help="The model.")],
    server: ServerOpt = "localhost:8001",
    json_lines: JsonOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """Serve again the version of NAME that served before its last change."""
    _run(server, timeout, json_lines, lambda admin: admin.rollback(name))


@app.command()
def reload(server: ServerOpt = "localhost:8001", json_lines: JsonOpt = False, timeout: TimeoutOpt = 600.0) -> None:
    """Read the repository again and serve what its version policies pick (pins stay)."""
    _run(server, timeout, json_lines, lambda admin: admin.load())


ShareOpt = Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of batches, 0..1 (0 ends it).")]


@app.command()
def canary(
    name: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="The candidate version.")],
    share: ShareOpt = 0.1,
    server: ServerOpt = "localhost:8001",
    json_lines: JsonOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """VERSION of NAME answers SHARE of the batches (loaded beside the serving one); `load` promotes it."""
    _run(server, timeout, json_lines, lambda admin: admin.canary(name, version, share))


@app.command()
def shadow(
    name: Annotated[str, typer.Argument(help="The model.")],
    version: Annotated[str, typer.Argument(help="The candidate version.")],
    share: ShareOpt = 0.1,
    server: ServerOpt = "localhost:8001",
    json_lines: JsonOpt = False,
    timeout: TimeoutOpt = 600.0,
) -> None:
    """VERSION of NAME also runs on SHARE of the batches, never answering: `list` shows how far it agrees."""
    _run(server, timeout, json_lines, lambda admin: admin.shadow(name, version, share))


@app.command()
def drift(server: ServerOpt = "localhost:8001", json_lines: JsonOpt = False, timeout: TimeoutOpt = 30.0) -> None:
    """How far the images answered lately are from the detector's reference profile (PSI per statistic)."""
    report = _call(server, timeout, lambda admin: admin.drift())
    if json_lines:
        print(json.dumps(asdict(report)))
        return
    if not report.enabled:
        print("no drift watch: the detector ships no reference profile, or --drift-window is 0")
        return
    table = Table(title=f"{report.model} v{report.version}: {report.window_images}/{report.window_size} images "
                  f"vs {report.reference}; flag over PSI {report.threshold:g}", title_justify="left")  # fmt: skip
    table.add_column("statistic")
    table.add_column("PSI", justify="right")
    table.add_column("")
    for name, (psi, flagged) in report.statistics.items():
        table.add_row(name, f"{psi:.3f}", "[red]drifted[/red]" if flagged else "")
    Console().print(table)
