"""Watching a server that runs as a child process: its address, its descendants, their exit.

For whoever starts ``infer-server serve`` as a subprocess and must account for every process it
spawned — the integration tests (teardown asserts no worker survives) and the fps benchmark (CPU
and memory of each process). Linux only: ``/proc`` and pidfds, no psutil.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def read_address(process: subprocess.Popen[str], timeout: float) -> str:
    """``HOST:PORT`` from the ``listening on HOST:PORT`` line the server prints once it serves."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(left):
                break
            line = process.stdout.readline()
            if not line:  # it exited before serving
                break
            if line.startswith("listening on "):
                return line.split()[-1]
    raise RuntimeError("the server did not report its address")


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (which may hold spaces and parentheses)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (children, grandchildren, ...), from one scan of /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := stat_fields(int(entry))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def is_alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def exit_waiters(pids: Sequence[int]) -> dict[int, int]:
    """A pidfd per process: readable once it exits, and immune to the pid being reused."""
    fds: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[pid] = os.pidfd_open(pid)
    return fds


def still_running(fds: dict[int, int], timeout: float) -> list[int]:
    """Processes of ``fds`` still running after ``timeout``; closes the pidfds."""
    deadline = time.monotonic() + timeout
    pending = dict(fds)
    while pending and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(list(pending.values()), [], [], left)
        pending = {pid: fd for pid, fd in pending.items() if fd not in ready}
    for fd in fds.values():
        os.close(fd)
    return list(pending)
