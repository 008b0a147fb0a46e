"""One load client of infer.v1 (the server's own client library), the same workload as
``triton_load.py``: requests of ``batch`` images for ``seconds``; prints how many were answered and
the CPU seconds it spent from the go (its threads together).
It sends one request first (its connection, its Session), prints ``ready``, and starts when a line
arrives on its standard input (``benchmarks.oip.run_clients``: every client starts together, once
all are up, so no client's start-up counts).

    python v1_load.py HOST:PORT SHM_DIR tmpfs|inline|local:SOCKET|local-inline:SOCKET SECONDS BATCH IMAGE...

``local:SOCKET`` (tmpfs), ``local-inline:SOCKET``: the Session on the server's local socket
(``--local-socket``).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from infer_client import InferClient


def main() -> None:
    url, shm_dir, transport = sys.argv[1:4]
    seconds, batch = float(sys.argv[4]), int(sys.argv[5])
    images = [Path(p).read_bytes() for p in sys.argv[6:]]
    kind, _, local = transport.partition(":")  # local:SOCKET, local-inline:SOCKET
    transport = {"local": "tmpfs", "local-inline": "inline"}.get(kind, transport)
    with InferClient(url, shm_dir=shm_dir, transport=transport, local_socket=local or None) as client:  # type: ignore[arg-type]
        client.detect(images[:batch])
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":  # the benchmark gave up on the run
            return
        cpu = time.process_time()
        done, n, end = 0, 0, time.monotonic() + seconds
        while time.monotonic() < end:
            done += sum(r.ok for r in client.detect([images[(n + k) % len(images)] for k in range(batch)]))
            n += batch
        cpu = time.process_time() - cpu
    print(done, cpu)


if __name__ == "__main__":
    main()
