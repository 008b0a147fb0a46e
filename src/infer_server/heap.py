"""The cyclic garbage collector in a serving process (the main process, a shard, a worker).

Two things it does by default cost a server that makes and drops thousands of small records a
second. A full collection walks every object the process holds — some 45,000 once the main
process has imported the server's modules (gRPC, protobuf descriptors), 14 ms on a 2-core VM —
and comes round whenever enough survivors pile up: a pause in the middle of serving that only a
tail latency shows. And the youngest generation is collected every 700 allocations of container
objects, each time walking what is in flight then: about 1.7% of the main process's
instructions per push (``benchmarks.instructions``).

``settle()``, called once start-up is done, moves everything made so far out of the collector's
sight (``gc.freeze``: what start-up made lives as long as the process) and, in the main process
and the shards, collects the youngest generation every ``YOUNG_THRESHOLD`` allocations instead; a
cycle of garbage then waits at most that many allocations longer. A worker keeps the default: a
cycle there can hold an image's buffers (a traceback's frames), and its resident memory is what
retires it (``stage.worker``). Reference counting still frees everything else at once.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 7000  # container allocations between collections of the youngest generation (default 700)


def settle(young: int | None = YOUNG_THRESHOLD) -> None:
    """Freeze what the process holds now; collect its youngest generation every ``young``
    allocations (None: as before)."""
    gc.collect()  # what start-up left as garbage goes now, not frozen for good
    gc.freeze()
    if young is not None:
        _, middle, oldest = gc.get_threshold()
        gc.set_threshold(young, middle, oldest)
