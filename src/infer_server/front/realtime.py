"""The main process's event loop at a real-time scheduling policy (``--realtime-priority``).

The main process is one thread that every push passes through twice: admission and hand-off on
the way in, results and replies on the way out. Under load it is the link of the chain the others
wait for, and at the normal policy it also waits for a core: the worker or client it has just
woken takes the core it ran on, and the scheduler may leave it queued there while another core
idles (docs/performance.md, "The main process at a real-time policy"). At ``SCHED_FIFO`` it takes
a core from any normal-policy task as soon as it has work, and a wake-up places it on a core that
runs no real-time task, an idle one first.

Only this thread gets the policy: ``SCHED_RESET_ON_FORK`` puts every process and thread it makes
afterwards (workers, front processes, gRPC's and the executor's threads) back at the normal one.
The loop sleeps in ``epoll`` whenever it has nothing to do, so it takes only the CPU its work
needs; the kernel's real-time throttling (``kernel.sched_rt_runtime_us``, 95% of each period by
default) leaves the rest of a core to others even if it never slept.
"""

from __future__ import annotations

import os
import resource


def run_realtime(priority: int) -> None:
    """Put the calling thread at ``SCHED_FIFO`` ``priority`` (1–99), what it starts later at the
    normal policy. Raises ``RuntimeError`` saying what the kernel needs when it refuses."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except PermissionError as exc:
        limit = resource.getrlimit(resource.RLIMIT_RTPRIO)[0]
        shown = "unlimited" if limit == resource.RLIM_INFINITY else limit
        raise RuntimeError(
            f"--realtime-priority {priority}: the kernel refused SCHED_FIFO ({exc.strerror}): it takes "
            f"CAP_SYS_NICE (e.g. a container's --cap-add SYS_NICE) or an RLIMIT_RTPRIO of at least {priority} "
            f"(ulimit -r; this process has {shown}), and a cgroup that allows real-time tasks; "
            "--realtime-priority 0 runs at the normal policy"
        ) from None
