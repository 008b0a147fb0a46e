"""``infer-server`` (and ``python -m infer_server``): run the server until SIGTERM/SIGINT.

The command line is the operator's entry point. ``serve`` has one option per field of
``settings.ServerSettings``, derived from the model (name, type, help), so a new setting is a flag
and an ``INFER_*`` environment variable the moment it is added there; a flag beats the environment,
which beats the default. Once every worker is ready and health reports SERVING, the command prints
``listening on HOST:PORT`` on stdout (the bound port, also with ``--port 0``) so scripts can wait
for that line. SIGTERM or SIGINT drains and stops.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from infer_proto.grpc_io import EPOLL_IO, prefer_epoll_io
from infer_server import event_loop
from infer_server.settings import ServerSettings

if typing.TYPE_CHECKING:
    from infer_server.front.choices import ModelState

app = typer.Typer(add_completion=False, no_args_is_help=True, help="gRPC inference server with tmpfs handoff.")
log = logging.getLogger("infer_server")


@app.callback()
def main() -> None:
    """gRPC inference server with tmpfs handoff."""


def _option_type(annotation: Any) -> type:
    """The click-friendly type of a settings field: ``X | None`` → ``X``; a ``Literal`` of strings → str."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _option_type(args[0])
    if typing.get_origin(annotation) is typing.Literal:
        return str
    if annotation in (int, float, str, bool, Path):
        return annotation
    raise TypeError(f"no command-line type for {annotation!r}")


def _option(name: str, field: FieldInfo) -> inspect.Parameter:
    flag = "--" + name.replace("_", "-")
    kind = _option_type(field.annotation)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag, *extra.get("flags", [])]  # type: ignore[misc]
    env = f"INFER_{name.upper()}"
    option = typer.Option(*decls, help=f"{field.description} (env {env}; default {field.default})", show_default=False)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def _settings_command(run: Callable[[ServerSettings], None]) -> Callable[..., None]:
    """A command whose options are the settings' fields; it builds the settings and calls ``run``."""

    def command(**given: Any) -> None:
        try:
            settings = ServerSettings(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as exc:
            typer.echo(f"invalid settings:\n{exc}", err=True)
            raise typer.Exit(2) from None
        run(settings)

    params = [
        _option(name, field)
        for name, field in ServerSettings.model_fields.items()
        if not (isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("internal"))
    ]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = run.__doc__
    return command


# Variables earlier releases read, and the setting that replaced each.
_RENAMED_ENV = {"INFER_SERVER_PLAN_CACHE": "INFER_PLAN_CACHE_DIR", "INFER_SERVER_WORKER_LOG_LEVEL": "INFER_LOG_LEVEL"}


def serve(settings: ServerSettings) -> None:
    """Serve InferenceService, health and reflection until SIGTERM/SIGINT."""
    if settings.shard_index:  # from the environment: only the server starts shards
        typer.echo("invalid settings: INFER_SHARD_INDEX is set by the server for the shards it starts", err=True)
        raise typer.Exit(2)
    _prepare(settings)
    raise typer.Exit(event_loop.run(_serve(settings), settings.event_loop))


def serve_shard(
    settings: ServerSettings, link: socket.socket, models: ModelState | None, relay: socket.socket, usage: int | None
) -> None:
    """One shard of a server the main process runs (``front.shards``), serving ``models`` (None:
    what the repository's version policies pick) until SIGTERM/SIGINT or ``link``, its socket to
    the main process, ends; ``ready`` goes down it once it serves, model changes come up it. The
    gRPC calls the main process hands it come on ``relay`` (``front.shard_relay``); ``usage``: the
    descriptor of the table of each caller's work on every shard (``front.caller_usage``), if any."""
    _prepare(settings)
    sys.exit(event_loop.run(_serve(settings, (link, models, relay, usage)), settings.event_loop))


def _prepare(settings: ServerSettings) -> None:
    """Logging, and what must be set before gRPC is loaded."""
    logging.basicConfig(
        level=settings.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s {settings.log_mark}%(levelname)s %(name)s: %(message)s",
    )
    for old, new in _RENAMED_ENV.items():
        if old in os.environ:
            log.warning("%s is no longer read: set %s (or its flag) instead", old, new)
    if settings.realtime_priority:  # this thread runs the loop; a refusal ends it before gRPC is even loaded
        from infer_server.front.realtime import run_realtime

        try:
            run_realtime(settings.realtime_priority)
        except RuntimeError as exc:
            log.error("cannot start: %s", exc)
            raise typer.Exit(1) from None
        log.info(
            "event loop at SCHED_FIFO priority %d (its workers and other threads at the normal policy)",
            settings.realtime_priority,
        )
    if prefer_epoll_io():  # before grpc is imported (in _serve)
        log.info("gRPC I/O: epoll path (GRPC_EXPERIMENTS=%s; set GRPC_EXPERIMENTS to choose)", EPOLL_IO)


app.command(name="serve")(_settings_command(serve))


@app.command()
def health(
    address: Annotated[str, typer.Option(help="Server address: HOST:PORT or unix:PATH.")] = "127.0.0.1:8001",
    service: Annotated[str, typer.Option(help="Service to ask about ('' = the whole server).")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 5.0,
) -> None:
    """Ask the gRPC health service; exit 0 when SERVING, 1 otherwise (a container's health check).

    TLS is used when INFER_TLS_CA is set (with INFER_TLS_CERT and INFER_TLS_KEY for a server that
    requires client certificates); health needs no token."""
    prefer_epoll_io()
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from infer_client import Credentials
    from infer_client._protocol import open_channel

    with open_channel(address, [], Credentials.from_env()) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            typer.echo(f"{address}: {exc.code().name}: {exc.details()}", err=True)
            raise typer.Exit(1) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    typer.echo(f"{address}: {status}")
    raise typer.Exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)


async def _serve(
    settings: ServerSettings, shard: tuple[socket.socket, ModelState | None, socket.socket, int | None] | None = None
) -> int:
    """The main process (``shard`` None) or a shard (its link to the main process, its models, its
    relay, the callers' work table)."""
    # Imported here so `--help` does not pay for grpc and the pool.
    from infer_server import heap
    from infer_server.front.server import InferenceServer
    from infer_server.front.shard_link import LINE_LIMIT, answer_main
    from infer_server.front.shards import remove_leftovers
    from infer_server.supervisor.pool import PipelineError

    log.info("event loop: %s", event_loop.running_kind())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    if shard is None:  # the main process: what shards of an earlier run left
        remove_leftovers(settings)
    else:  # its main process holds the link's other end while it runs
        reader, link = await asyncio.open_unix_connection(sock=shard[0], limit=LINE_LIMIT)
    server = InferenceServer(settings)
    server.control.adopt(shard[1] if shard else None)
    if shard and shard[3] is not None:
        from infer_server.front.caller_usage import CallerUsage

        server.registry.peers = CallerUsage(shard[3], settings.shards, settings.shard_index)
    try:
        # A signal during startup is honoured once start() returns: the pool's start cannot be
        # interrupted half-way without leaving workers behind, and it is bounded by its timeout.
        port = await server.start(shard[2] if shard else None)
    except PipelineError as exc:
        log.error("the pipeline failed to start: %s", exc)
        return 1
    except RuntimeError as exc:  # a directory the server cannot trust, a port it cannot bind
        log.error("cannot start: %s", exc)
        return 1
    heap.settle()  # what start-up made stays: out of the collector's sight
    if not stop.is_set():
        if shard is None:
            print(f"listening on {settings.host}:{port}", flush=True)
        else:  # a main process gone already ends the link at once: the shard drains
            link.write(b"ready\n")
            following = asyncio.ensure_future(answer_main(reader, link, server))
            following.add_done_callback(lambda _: stop.set())
        await stop.wait()
    log.info("signal received: draining")
    if server.on_status is not None:  # a shard: the server is not whole while it drains
        server.on_status(False)
    await server.stop()
    return 0


if __name__ == "__main__":
    app()
