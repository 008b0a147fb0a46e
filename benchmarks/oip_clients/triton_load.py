"""One load client written with tritonclient (run with .venv-triton's python by benchmarks/oip.py):
requests of ``batch`` images to ``pipeline`` for ``seconds``, inline or through system shared memory;
prints how many images were answered and the CPU seconds it spent from the go. Like ``v1_load.py``:
one request first, ``ready``, then it waits for a line on its standard input.

    python triton_load.py HOST:PORT inline|shm SECONDS BATCH IMAGE...

With ``TRITON_LOAD_BATCHED=1`` in the environment the tensor is [BATCH, 1]: a model with Triton's
batch dimension (``max_batch_size`` > 0, as Triton's own peer in ``benchmarks/peers.py``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import serialize_byte_tensor, serialized_byte_size


def main() -> None:
    url, mode, seconds, batch = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    images = [Path(p).read_bytes() for p in sys.argv[5:]]
    client = grpcclient.InferenceServerClient(url)
    shape = [batch, 1] if os.environ.get("TRITON_LOAD_BATCHED") == "1" else [batch]
    batches = [np.array([images[(i + k) % len(images)] for k in range(batch)], dtype=np.object_).reshape(shape)
               for i in range(8)]  # fmt: skip
    region = None
    if mode == "shm":
        data = [serialize_byte_tensor(b) for b in batches]
        size = max(serialized_byte_size(d) for d in data)
        key = f"/oip-bench-{os.getpid()}"
        region = shm.create_shared_memory_region(key[1:], key, size)
        client.register_system_shared_memory(key[1:], key, size)
    done, end, n, warm, cpu = 0, 0.0, 0, True, 0.0
    try:
        while warm or time.monotonic() < end:
            tensor = grpcclient.InferInput("IMAGES", shape, "BYTES")
            if region is not None:
                shm.set_shared_memory_region(region, [data[n % 8]])
                tensor.set_shared_memory(key[1:], serialized_byte_size(data[n % 8]))
            else:
                tensor.set_data_from_numpy(batches[n % 8])
            result = client.infer("pipeline", [tensor], outputs=[grpcclient.InferRequestedOutput("STATUS")])
            if warm:  # the first request: connection and region set up, not counted
                warm = False
                print("ready", flush=True)
                if sys.stdin.readline().strip() != "go":  # the benchmark gave up on the run
                    return
                end, cpu = time.monotonic() + seconds, time.process_time()
                continue
            done += int((result.as_numpy("STATUS") == 0).sum())
            n += 1
        cpu = time.process_time() - cpu
    finally:
        if region is not None:
            client.unregister_system_shared_memory(key[1:])
            shm.destroy_shared_memory_region(region)
    print(done, cpu)


if __name__ == "__main__":
    main()
