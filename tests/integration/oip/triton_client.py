"""A tritonclient application, unmodified, run by tests/integration/test_open_inference.py with the
Triton client's own virtualenv (.venv-triton: tritonclient's protobuf < 7 cannot share the server's).

    python triton_client.py HOST:PORT IMAGE...   → one JSON document on stdout
"""

from __future__ import annotations

import json
import queue
import sys
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import serialize_byte_tensor, serialized_byte_size


def images_input(images: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("IMAGES", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
    return tensor


def answer(result: grpcclient.InferResult) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(doc) for doc in result.as_numpy("DETECTIONS")]


def main() -> None:
    url, paths = sys.argv[1], sys.argv[2:]
    images = [Path(p).read_bytes() for p in paths]
    client = grpcclient.InferenceServerClient(url)
    out: dict = {"live": client.is_server_live(), "ready": client.is_server_ready(),  # type: ignore[type-arg]
                 "model_ready": client.is_model_ready("pipeline")}
    metadata = client.get_model_metadata("pipeline", as_json=True)
    out["inputs"] = [(t["name"], t["datatype"]) for t in metadata["inputs"]]
    out["outputs"] = [t["name"] for t in metadata["outputs"]]
    config = client.get_model_config("pipeline", as_json=True)["config"]
    out["config"] = [config["name"], config["input"][0]["name"], config["input"][0]["data_type"]]
    result = client.infer("pipeline", [images_input(images)])
    out["inline"] = answer(result)
    out["count"] = result.as_numpy("COUNT").tolist()
    out["boxes_shape"] = list(result.as_numpy("BOXES").shape)

    # System shared memory: the images in a region the client created (shm_open: /dev/shm/<key>).
    data = serialize_byte_tensor(np.array(images, dtype=np.object_))
    size = serialized_byte_size(data)
    region = shm.create_shared_memory_region("images", "/oip-test-images", size)
    try:
        shm.set_shared_memory_region(region, [data])
        client.register_system_shared_memory("images", "/oip-test-images", size)
        out["regions"] = list(client.get_system_shared_memory_status(as_json=True).get("regions", {}))
        tensor = grpcclient.InferInput("IMAGES", [len(images)], "BYTES")
        tensor.set_shared_memory("images", size)
        out["shm"] = answer(client.infer("pipeline", [tensor]))
        # ... and an output written into another region the client created.
        counts = shm.create_shared_memory_region("counts", "/oip-test-counts", 4 * len(images))
        try:
            client.register_system_shared_memory("counts", "/oip-test-counts", 4 * len(images))
            wanted = grpcclient.InferRequestedOutput("COUNT")
            wanted.set_shared_memory("counts", 4 * len(images))
            client.infer("pipeline", [images_input(images)], outputs=[wanted])
            out["shm_count"] = shm.get_contents_as_numpy(counts, np.int32, [len(images)]).tolist()
            client.unregister_system_shared_memory("counts")
        finally:
            shm.destroy_shared_memory_region(counts)
        client.unregister_system_shared_memory("images")
    finally:
        shm.destroy_shared_memory_region(region)

    done: queue.Queue = queue.Queue()  # type: ignore[type-arg]
    client.async_infer("pipeline", [images_input(images)], callback=lambda result, error: done.put((result, error)))
    result, error = done.get(timeout=120)
    out["async"] = answer(result) if error is None else str(error)

    client.start_stream(callback=lambda result, error: done.put((result, error)))
    client.async_stream_infer("pipeline", [images_input(images)])
    result, error = done.get(timeout=120)
    client.stop_stream()
    out["stream"] = answer(result) if error is None else str(error)
    out["statistics"] = client.get_inference_statistics("pipeline", as_json=True)["model_stats"][0]["inference_count"]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
