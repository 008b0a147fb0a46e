"""``infer-server`` (and ``python -m infer_server``): run the server until SIGTERM/SIGINT.

The command line is the operator's entry point: options override ``INFER_*`` environment
variables, which override the defaults in ``settings.ServerSettings``. Once every worker is ready
and health reports SERVING, the command prints ``listening on HOST:PORT`` on stdout (the bound port,
also with ``--port 0``) so scripts can wait for that line. SIGTERM or SIGINT drains and stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from infer_proto.grpc_io import EPOLL_IO, prefer_epoll_io
from infer_server.settings import ServerSettings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="gRPC inference server with tmpfs handoff.")
log = logging.getLogger("infer_server")


@app.callback()
def main() -> None:
    """gRPC inference server with tmpfs handoff."""


@app.command()
def serve(
    models: Annotated[Path | None, typer.Option(help="Model repository directory.")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (0.0.0.0 for all).")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind; 0 picks a free one.")] = None,
    shm_dir: Annotated[Path | None, typer.Option(help="Shared directory clients write batches into.")] = None,
    staging_dir: Annotated[Path | None, typer.Option(help="Server-owned staging directory.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or gpu.")] = None,
    workers: Annotated[int | None, typer.Option(help="Stage worker processes.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per pipeline batch.")] = None,
    max_batch_images: Annotated[int | None, typer.Option(help="Images per pushed batch.")] = None,
    max_batch_bytes: Annotated[int | None, typer.Option(help="Bytes per pushed batch.")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="Pixels per image (checked from the header).")] = None,
    max_inflight_images: Annotated[int | None, typer.Option(help="Images in flight per server.")] = None,
    max_inflight_bytes: Annotated[int | None, typer.Option(help="Bytes in flight per server.")] = None,
    max_concurrent_rpcs: Annotated[int | None, typer.Option(help="Concurrent RPCs (streams included).")] = None,
    max_message_bytes: Annotated[int | None, typer.Option(help="Largest gRPC message.")] = None,
    batch_deadline: Annotated[float | None, typer.Option(help="Seconds a batch may take.")] = None,
    result_ttl: Annotated[float | None, typer.Option(help="Seconds finished results are kept.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics on this port.")] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR.")] = None,
    null_model: Annotated[
        bool | None,
        typer.Option(
            "--null-model/--no-null-model",
            help="Benchmarking only: read and header-check every image, run no model, return no detections.",
        ),
    ] = None,
) -> None:
    """Serve InferenceService, health and reflection until SIGTERM/SIGINT."""
    given: dict[str, Any] = {
        "models_dir": models,
        "host": host,
        "port": port,
        "shm_dir": shm_dir,
        "staging_dir": staging_dir,
        "device": device,
        "workers": workers,
        "batch_size": batch_size,
        "max_batch_images": max_batch_images,
        "max_batch_bytes": max_batch_bytes,
        "max_image_pixels": max_image_pixels,
        "max_inflight_images": max_inflight_images,
        "max_inflight_bytes": max_inflight_bytes,
        "max_concurrent_rpcs": max_concurrent_rpcs,
        "max_message_bytes": max_message_bytes,
        "batch_deadline_s": batch_deadline,
        "result_ttl_s": result_ttl,
        "metrics_port": metrics_port,
        "log_level": log_level.upper() if log_level else None,
        "null_model": null_model,
    }
    try:
        settings = ServerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"invalid settings:\n{exc}", err=True)
        raise typer.Exit(2) from None
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if prefer_epoll_io():  # before grpc is imported (in _serve)
        log.info("gRPC I/O: epoll path (GRPC_EXPERIMENTS=%s; set GRPC_EXPERIMENTS to choose)", EPOLL_IO)
    raise typer.Exit(asyncio.run(_serve(settings)))


async def _serve(settings: ServerSettings) -> int:
    # Imported here so `--help` does not pay for grpc and the pool.
    from infer_server.pool import PipelineError
    from infer_server.service import InferenceServer

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = InferenceServer(settings)
    try:
        # A signal during startup is honoured once start() returns: the pool's start cannot be
        # interrupted half-way without leaving workers behind, and it is bounded by its timeout.
        port = await server.start()
    except PipelineError as exc:
        log.error("the pipeline failed to start: %s", exc)
        return 1
    if not stop.is_set():
        print(f"listening on {settings.host}:{port}", flush=True)
        await stop.wait()
    log.info("signal received: draining")
    await server.stop()
    return 0


if __name__ == "__main__":
    app()
