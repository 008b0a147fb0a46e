"""``heap.settle``: what start-up made leaves the collector's sight; garbage made afterwards,
cycles included, is still collected."""

from __future__ import annotations

import subprocess
import sys

_CHECK = """
import gc, weakref
from infer_server import heap

class Node:
    pass

kept = [Node() for _ in range(1000)]
assert gc.get_freeze_count() == 0
heap.settle()
assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
a, b = Node(), Node()
a.other, b.other = b, a  # a cycle made after start-up: only the collector frees it
gone = weakref.ref(a)
del a, b
gc.collect()
assert gone() is None
heap.settle(young=None)  # a worker's: the threshold stays
assert gc.get_threshold()[0] == heap.YOUNG_THRESHOLD
print("ok")
"""


def test_settle_freezes_start_up_and_still_collects_later_cycles() -> None:
    done = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
