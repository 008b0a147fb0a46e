"""``infer-client``: detect objects in a few images, or stream a whole directory through the server.

Runs in the user's shell process. ``detect`` uses the blocking client and prints a table per image
(or one JSON object per image with ``--json``; ``--annotate DIR`` also writes JPEGs with the boxes
drawn). ``batch`` uses the asyncio client to keep a bounded number of batches in flight, retries
overloaded pushes with backoff (same request id, so a retry never duplicates work) and writes one
JSON line per image. ``models`` lists and changes the server's models (``models_cli``).
Exit status: 0 all images answered OK, 1 some image failed, 2 an RPC failed.
Credentials for a server that asks for them come from the environment (``Credentials.from_env``:
``INFER_TOKEN`` or ``INFER_TOKEN_FILE``, ``INFER_TLS_CA``, ``INFER_TLS_CERT``, ``INFER_TLS_KEY``),
never from the command line, where every user of the host could read them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, TextIO

import grpc
import typer
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

from infer_client import AsyncInferClient, Credentials, ImageResult, InferClient, InferError, Transport
from infer_client._protocol import DEFAULT_SHM_DIR
from infer_client.annotate import write_annotated
from infer_client.models_cli import app as models_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Client of the inference server. Credentials, where the server asks: INFER_TOKEN or INFER_TOKEN_FILE; "
    "TLS: INFER_TLS_CA (and INFER_TLS_CERT, INFER_TLS_KEY for a client certificate).",
)
app.add_typer(models_app, name="models")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}

ServerOpt = Annotated[str, typer.Option("--server", "-s", help="Server address, e.g. localhost:8001.")]
TransportOpt = Annotated[str, typer.Option(help="auto, tmpfs or inline.")]
ShmOpt = Annotated[Path, typer.Option(help="Shared directory of the server (tmpfs transport).")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds per RPC (the whole stream for results).")]


@app.callback()
def main() -> None:
    """Client of the inference server."""


LocalSocketOpt = Annotated[
    Path | None, typer.Option(help="The server's --local-socket: batches go there, without gRPC.")
]


def _transport(value: str) -> Transport:
    if value not in ("auto", "tmpfs", "inline"):
        raise typer.BadParameter("transport must be auto, tmpfs or inline")
    return value  # type: ignore[return-value]


@app.command()
def detect(
    images: Annotated[list[Path], typer.Argument(help="JPEG/PNG files.", exists=True, dir_okay=False)],
    server: ServerOpt = "localhost:8001",
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per image.")] = False,
    annotate: Annotated[Path | None, typer.Option(help="Write annotated JPEGs into this directory.")] = None,
    transport: TransportOpt = "auto",
    shm_dir: ShmOpt = Path(DEFAULT_SHM_DIR),
    timeout: TimeoutOpt = 120.0,
    local_socket: LocalSocketOpt = None,
) -> None:
    """Detect objects and attributes in IMAGES (one batch)."""
    err = Console(stderr=True)
    try:
        credentials = Credentials.from_env()
        with InferClient(
            server, shm_dir=shm_dir, transport=_transport(transport), timeout=timeout, credentials=credentials,
            local_socket=local_socket,
        ) as client:  # fmt: skip
            results = client.detect([str(p) for p in images])
    except InferError as exc:
        err.print(f"[red]error[/red]: {exc}")
        raise typer.Exit(2) from None
    if json_lines:
        for result in results:
            print(json.dumps(result.to_dict()))
    else:
        console = Console()
        for result in results:
            console.print(_table(result))
    if annotate is not None:
        annotate.mkdir(parents=True, exist_ok=True)
        for path, result in zip(images, results, strict=True):
            if result.ok:
                write_annotated(path, result, annotate / f"{path.stem}.jpg")
    raise typer.Exit(0 if all(r.ok for r in results) else 1)


def _table(result: ImageResult) -> Table:
    status = "[green]OK[/green]" if result.ok else f"[red]{result.code.name}[/red]: {result.message}"
    title = f"{result.name or result.index}  {result.width}x{result.height}  {status}"
    table = Table(title=title, title_justify="left")
    for column in ("#", "label", "score", "box (x1, y1, x2, y2)", "attributes"):
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    for i, det in enumerate(result.detections):
        box = ", ".join(f"{v:.0f}" for v in det.box.as_tuple())
        attrs = ", ".join(f"{m}={a.label} ({a.score:.2f})" for m, a in det.attributes.items())
        table.add_row(str(i), det.label, f"{det.score:.2f}", box, attrs)
    return table


@app.command()
def batch(
    directory: Annotated[Path, typer.Argument(help="Directory of images (searched recursively).")],
    server: ServerOpt = "localhost:8001",
    out: Annotated[Path, typer.Option(help="JSON lines output, one per image.")] = Path("results.jsonl"),
    chunk: Annotated[int, typer.Option(min=1, max=256, help="Images per pushed batch.")] = 32,
    max_in_flight: Annotated[int, typer.Option(min=1, help="Batches in flight at once.")] = 4,
    transport: TransportOpt = "auto",
    shm_dir: ShmOpt = Path(DEFAULT_SHM_DIR),
    timeout: TimeoutOpt = 300.0,
    local_socket: LocalSocketOpt = None,
) -> None:
    """Run every image under DIRECTORY through the server; write results to --out."""
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        typer.echo(f"no images under {directory}", err=True)
        raise typer.Exit(2)
    chunks = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    started = time.perf_counter()
    with out.open("w") as sink:
        failed, rpc_failed = asyncio.run(
            _run_batches(chunks, server, _transport(transport), shm_dir, timeout, max_in_flight, sink, local_socket)
        )
    elapsed = time.perf_counter() - started
    typer.echo(f"{len(files)} images, {failed} failed, {len(files) / elapsed:.1f} images/s -> {out}", err=True)
    raise typer.Exit(2 if rpc_failed else 1 if failed else 0)


async def _run_batches(
    chunks: Sequence[list[Path]],
    server: str,
    transport: Transport,
    shm_dir: Path,
    timeout: float,
    max_in_flight: int,
    sink: TextIO,
    local_socket: Path | None = None,
) -> tuple[int, bool]:
    slots = asyncio.Semaphore(max_in_flight)
    failed = 0
    rpc_failed = False
    progress = tqdm(total=sum(len(c) for c in chunks), unit="img", file=sys.stderr)

    async def run_one(client: AsyncInferClient, paths: list[Path]) -> None:
        nonlocal failed, rpc_failed
        try:
            results = await _detect_with_retry(client, paths)
        except InferError as exc:
            rpc_failed = True
            failed += len(paths)
            for i, p in enumerate(paths):
                status = {"code": exc.code.value[0], "name": exc.code.name, "message": exc.message}
                sink.write(json.dumps({"batch_id": "", "index": i, "name": str(p), "status": status}) + "\n")
        else:
            for result in results:
                failed += not result.ok
                sink.write(json.dumps(result.to_dict()) + "\n")
        finally:
            progress.update(len(paths))
            slots.release()

    credentials = Credentials.from_env()
    async with AsyncInferClient(
        server, shm_dir=shm_dir, transport=transport, timeout=timeout, credentials=credentials,
        local_socket=local_socket,
    ) as client:  # fmt: skip
        await client.wait_ready(timeout=timeout)
        tasks = []
        for paths in chunks:
            await slots.acquire()  # bounded: a new batch starts only when one finished
            tasks.append(asyncio.create_task(run_one(client, paths)))
        await asyncio.gather(*tasks)
    progress.close()
    return failed, rpc_failed


async def _detect_with_retry(client: AsyncInferClient, paths: list[Path], attempts: int = 8) -> list[ImageResult]:
    """detect(), retrying RESOURCE_EXHAUSTED/UNAVAILABLE with exponential backoff."""
    request_id = uuid.uuid4().hex
    names = [str(p) for p in paths]
    for attempt in range(attempts):
        try:
            return await client.detect([str(p) for p in paths], names=names, request_id=request_id)
        except InferError as exc:
            retryable = exc.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE)
            if not retryable or attempt == attempts - 1:
                raise
            await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
    raise AssertionError("unreachable")
