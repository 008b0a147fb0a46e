"""One load client of infer.v1 (the server's own client library), the same workload as
``triton_load.py``: requests of ``batch`` images for ``seconds``; prints how many were answered.
It sends one request first (its connection, its Session), prints ``ready``, and starts when a line
arrives on its standard input (``benchmarks.oip.run_clients``: every client starts together, once
all are up, so no client's start-up counts).

    python v1_load.py HOST:PORT SHM_DIR tmpfs|inline|local:SOCKET SECONDS BATCH IMAGE...

``local:SOCKET``: tmpfs, with the Session on the server's local socket (``--local-socket``).
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
    local = transport.removeprefix("local:") if transport.startswith("local:") else None
    with InferClient(url, shm_dir=shm_dir, transport="tmpfs" if local else transport,  # type: ignore[arg-type]
                     local_socket=local) as client:  # fmt: skip
        client.detect(images[:batch])
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":  # the benchmark gave up on the run
            return
        done, n, end = 0, 0, time.monotonic() + seconds
        while time.monotonic() < end:
            done += sum(r.ok for r in client.detect([images[(n + k) % len(images)] for k in range(batch)]))
            n += batch
    print(done)


if __name__ == "__main__":
    main()
