"""``--realtime-priority``: the calling thread at SCHED_FIFO, what it starts afterwards at the normal
policy, and a refusal that says what the kernel wants (``front.realtime``).

Each case runs in a child process: the test process itself must not become real-time.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap

import pytest
from pydantic import ValidationError

from infer_server.settings import ServerSettings
from tests.helpers import without_realtime

_PRIVILEGED = os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_RTPRIO)[0] >= 1

# What the child reports: its own policy and priority, a thread's it starts, a process's it starts.
_REPORT = textwrap.dedent("""
    import json, os, subprocess, sys, threading
    from infer_server.front.realtime import run_realtime
    run_realtime(1)
    seen = {}
    thread = threading.Thread(target=lambda: seen.update(thread=os.sched_getscheduler(0)))
    thread.start()
    thread.join()
    child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                           capture_output=True, text=True, check=True)
    print(json.dumps({"self": os.sched_getscheduler(0), "priority": os.sched_getparam(0).sched_priority,
                      "thread": seen["thread"], "child": int(child.stdout)}))
""")

_REFUSED = textwrap.dedent("""
    from infer_server.front.realtime import run_realtime
    try:
        run_realtime(1)
    except RuntimeError as exc:
        print(exc)
    else:
        print("accepted")
""")


def _python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(not _PRIVILEGED, reason="needs root or an RLIMIT_RTPRIO of 1, to be real-time")
def test_the_thread_runs_realtime_and_what_it_starts_runs_at_the_normal_policy() -> None:
    report = json.loads(_python(_REPORT))
    assert (report["self"], report["priority"]) == (os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, 1)
    assert report["thread"] == os.SCHED_OTHER, "a thread started later: gRPC's, the executor's"
    assert report["child"] == os.SCHED_OTHER, "a process started later: a worker, a front process"


def test_a_refusal_says_what_the_kernel_needs() -> None:
    done = without_realtime([sys.executable, "-c", _REFUSED], timeout=60)
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip()
    assert said.startswith("--realtime-priority 1: the kernel refused SCHED_FIFO"), said
    assert "CAP_SYS_NICE" in said and "RLIMIT_RTPRIO of at least 1" in said and "this process has 0" in said


def test_the_priority_is_one_the_kernel_takes_or_zero() -> None:
    assert ServerSettings().realtime_priority == 0, "the normal policy unless asked"
    assert ServerSettings(realtime_priority=99).realtime_priority == 99
    for wrong in (-1, 100):
        with pytest.raises(ValidationError):
            ServerSettings(realtime_priority=wrong)
