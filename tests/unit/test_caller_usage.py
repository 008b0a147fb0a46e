"""``front.caller_usage``: each caller's in-flight work on the other shards, read from one shared
memory file that each shard writes a row of."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from infer_server.front.caller_usage import CallerUsage


def views(shards: int) -> list[CallerUsage]:
    """Every shard's view of one table (each on a descriptor of its own, as a shard process has)."""
    main = CallerUsage.create(shards)
    return [main, *(CallerUsage(os.dup(main.fd), shards, k) for k in range(1, shards))]


def test_a_shard_sees_what_the_others_hold_and_not_its_own() -> None:
    main, other = views(2)
    main.add("alice", 3, 3000)
    assert other.elsewhere("alice") == (3, 3000)
    assert main.elsewhere("alice") == (0, 0)  # its own work it counts exactly, itself
    assert other.elsewhere("bob") == (0, 0)
    other.add("alice", 2, 10)
    assert main.elsewhere("alice") == (2, 10)
    main.add("alice", -3, -3000)  # its batches finished
    assert other.elsewhere("alice") == (0, 0)
    for view in (main, other):
        view.close()


def test_a_cleared_row_counts_nothing() -> None:
    main, one, two = views(3)
    one.add("alice", 5, 50)
    two.add("alice", 1, 10)
    assert main.elsewhere("alice") == (6, 60)
    main.clear(1)  # shard 1 exited: its batches went with it
    assert main.elsewhere("alice") == (1, 10)
    assert two.elsewhere("alice") == (0, 0)
    for view in (main, one, two):
        view.close()


def test_never_less_than_what_a_caller_holds_and_exact_for_nearly_all() -> None:
    shards = views(3)
    rng = random.Random(3)
    held: dict[tuple[int, str], int] = {}
    callers = [f"caller-{n}" for n in range(300)]
    for _ in range(5000):
        shard, caller = rng.randrange(3), rng.choice(callers)
        change = rng.randint(-held.get((shard, caller), 0), 8)
        shards[shard].add(caller, change, 100 * change)
        held[(shard, caller)] = held.get((shard, caller), 0) + change
    exact = 0
    for caller in callers:
        truth = held.get((1, caller), 0) + held.get((2, caller), 0)
        images, nbytes = shards[0].elsewhere(caller)
        assert images >= truth and nbytes >= 100 * truth
        exact += images == truth and nbytes == 100 * truth
    assert exact >= 0.99 * len(callers)
    for view in shards:
        view.close()


def test_each_table_has_its_own_salt() -> None:
    first, second = CallerUsage.create(2), CallerUsage.create(2)
    assert os.pread(first.fd, 16, 0) != os.pread(second.fd, 16, 0)
    first.close()
    second.close()


def test_another_process_writes_its_row_through_the_descriptor_it_inherits() -> None:
    main = CallerUsage.create(2)
    code = (
        "import sys; from infer_server.front.caller_usage import CallerUsage; "
        "CallerUsage(int(sys.argv[1]), 2, 1).add('alice', 4, 400)"
    )
    subprocess.run([sys.executable, "-c", code, str(main.fd)], pass_fds=(main.fd,), check=True, timeout=60)
    assert main.elsewhere("alice") == (4, 400)
    main.close()
