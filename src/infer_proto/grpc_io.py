"""Which I/O path gRPC core uses in a process: set before ``grpc`` is imported.

Called by the server's entry point (``infer-server serve``) and by the fps benchmark (which sets it
for its whole process tree: its client processes, and the servers it starts, which would set it
themselves); never by the client *library*, which must not change its host application's
environment: a same-host application calls it itself, first thing.

Since grpcio 1.80 gRPC core moves socket I/O for Python onto EventEngine threads: a message that
arrives is read by an EventEngine thread and then handed to the thread that polls the completion
queue (the grpc.aio poller, or the blocking API's channel thread) — one more thread wake-up per
message in each direction. On a same-host data path, where a batch costs about a dozen messages'
worth of CPU in all, that hand-over shows (the older epoll path, with the EventEngine client,
listener and endpoint experiments off, is cheaper at both ends: ``benchmarks/grpc_floor.py``,
figures in docs/performance.md). gRPC plans to remove these experiments, so the setting is
applied only to the grpcio releases it was measured with, and never over an explicit
``GRPC_EXPERIMENTS`` (set it, even empty, to choose yourself).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

EPOLL_IO = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
_MEASURED = ((1, 80), (1, 90))  # grpcio releases [from, to) where EventEngine is the default and the experiments exist


def prefer_epoll_io(environ: MutableMapping[str, str] = os.environ, modules: Mapping[str, Any] = sys.modules) -> bool:
    """Ask gRPC core for its epoll I/O path in this process (and its children); True if set.

    No-op when ``GRPC_EXPERIMENTS`` is already set, when ``grpc`` was already imported (too late to
    take effect reliably), or on a grpcio outside the measured releases.
    """
    if "GRPC_EXPERIMENTS" in environ or "grpc" in modules:
        return False
    try:
        version = tuple(int(part) for part in importlib.metadata.version("grpcio").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return False
    if not _MEASURED[0] <= version < _MEASURED[1]:
        return False
    environ["GRPC_EXPERIMENTS"] = EPOLL_IO
    return True
