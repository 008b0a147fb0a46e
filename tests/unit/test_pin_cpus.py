"""``--pin-workers``: which CPUs each worker gets (``stage.worker.pin_cpus``), and the server's CPU
set in the options its workers are given."""

from __future__ import annotations

import os

from infer_server.settings import ServerSettings
from infer_server.stage.worker import pin_cpus


def test_each_worker_gets_its_own_cpus_in_turn() -> None:
    cpus = (2, 3, 5, 7)
    assert [pin_cpus(n, cpus, 1) for n in range(4)] == [{2}, {3}, {5}, {7}]
    assert [pin_cpus(n, cpus, 2) for n in range(2)] == [{2, 3}, {5, 7}], "--intra-op-threads CPUs each"


def test_more_workers_than_cpus_share_them_round_and_round() -> None:
    assert [pin_cpus(n, (0, 1), 1) for n in range(5)] == [{0}, {1}, {0}, {1}, {0}]
    assert [pin_cpus(n, (0, 1, 2), 2) for n in range(3)] == [{0, 1}, {2, 0}, {1, 2}]
    assert pin_cpus(0, (4,), 3) == {4}, "more threads than CPUs: every CPU there is"


def test_the_options_carry_the_servers_cpu_set_only_when_pinning() -> None:
    assert ServerSettings().worker_options().cpus == ()
    assert ServerSettings(pin_workers=True).worker_options().cpus == tuple(sorted(os.sched_getaffinity(0)))
