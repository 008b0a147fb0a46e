"""Small builders shared by test folders."""

from __future__ import annotations

from typing import Any

from infer_server.messages import WorkerOptions
from infer_server.settings import ServerSettings


def worker_options(**settings: Any) -> WorkerOptions:
    """The options a server with these settings gives its workers (every other value its default)."""
    return ServerSettings(**settings).worker_options()
