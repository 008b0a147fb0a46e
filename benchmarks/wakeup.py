"""What a wake-up between two processes costs on this machine, on one CPU and across two.

The server hands every push between processes (client → main process → worker → main process →
client), so how fast a sleeping process starts running once woken bounds how much of the
machine a few clients can use. On a VM whose idle vCPUs halt, waking one means a trip through the
host (docs/performance.md, "Idle cores at 4 × 8"). Two measurements:

* **ping-pong**: two processes pass a byte back and forth over pipes, both pinned to the same CPU,
  then to two different ones: the round trip's median and 90th percentile.
* **busy waker**: a process that keeps computing wakes another every ~2 ms (over a pipe, then an
  eventfd), neither pinned: how long the woken one waits to run. Where the scheduler leaves it on
  the waker's CPU, that is most of the waker's slice, whatever the other CPU does.

    .venv/bin/python -m benchmarks.wakeup          # ~5 s; needs two CPUs
"""

from __future__ import annotations

import os
import statistics
import time

_ROUNDS = 2000
_BUSY_ROUNDS = 300


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _quantiles(values: list[float]) -> str:
    ordered = sorted(values)
    return f"median {statistics.median(ordered) * 1e6:7.1f} µs, p90 {ordered[int(len(ordered) * 0.9)] * 1e6:7.1f} µs"


def ping_pong(cpu_a: int, cpu_b: int, rounds: int = _ROUNDS) -> list[float]:
    """Round trips of one byte between this process on ``cpu_a`` and a child on ``cpu_b``."""
    to_child, from_parent = os.pipe()
    from_child, to_parent = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.sched_setaffinity(0, {cpu_b})
        for _ in range(rounds):
            os.read(to_child, 1)
            os.write(to_parent, b"x")
        os._exit(0)
    os.sched_setaffinity(0, {cpu_a})
    trips = []
    for _ in range(rounds):
        start = time.perf_counter()
        os.write(from_parent, b"x")
        os.read(from_child, 1)
        trips.append(time.perf_counter() - start)
    os.waitpid(pid, 0)
    for fd in (to_child, from_parent, from_child, to_parent):
        os.close(fd)
    return trips


def busy_waker(kind: str, rounds: int = _BUSY_ROUNDS) -> list[float]:
    """How long a process woken by a busy one (``kind``: pipe or eventfd) waits to run."""
    wake_read, wake_write = os.pipe()
    event = os.eventfd(0)
    report_read, report_write = os.pipe()
    pipe = kind == "pipe"
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        for _ in range(rounds):
            os.read(wake_read, 8) if pipe else os.eventfd_read(event)
            os.write(report_write, repr(time.perf_counter()).encode().ljust(32))
        os._exit(0)
    delays = []
    for _ in range(rounds):
        _spin(0.0003)
        woken = time.perf_counter()
        os.write(wake_write, b"x") if pipe else os.eventfd_write(event, 1)
        _spin(0.002)  # still busy: the woken process must run elsewhere or wait for this one
        delays.append(float(os.read(report_read, 32)) - woken)
    os.waitpid(pid, 0)
    for fd in (wake_read, wake_write, event, report_read, report_write):
        os.close(fd)
    return delays


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("needs two CPUs")
    a, b = cpus[:2]
    print(f"ping-pong, one CPU ({a}):      {_quantiles(ping_pong(a, a))}")
    print(f"ping-pong, two CPUs ({a}, {b}):  {_quantiles(ping_pong(a, b))}")
    os.sched_setaffinity(0, cpus)
    for kind in ("pipe", "eventfd"):
        print(f"woken by a busy process ({kind}): {_quantiles(busy_waker(kind))}")


if __name__ == "__main__":
    main()
