"""Triton's peer of this server in the benchmark (``benchmarks/peers.py``): a Python-backend model,
run by the ``tritonserver`` that nvidia-pytriton's wheel bundles, around the same pipeline code as
this server's workers — ``VisionPipeline``, or ``NullPipeline`` (read + header check) for the data
path — so that only the serving layer differs.

Triton's dynamic batcher hands ``execute`` the requests it gathered; their images run as one
pipeline call, as a worker of this server runs a group of chunks. Inputs: ``IMAGES`` BYTES
[batch, 1]; outputs: ``DETECTIONS`` (a JSON document per image) and ``STATUS`` (its gRPC code).

``paths.json`` beside this file (written by the benchmark) puts the repository's ``src``, a
directory holding only NumPy 1.x (Triton's Python stub is built against it: with NumPy 2 it
misreads BYTES tensors) and the server's own environment on the path, before anything is imported.
"""

import json
import pathlib
import sys

sys.path[:0] = json.loads((pathlib.Path(__file__).resolve().parent / "paths.json").read_text())

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (Triton's Python stub provides it)


def _document(outcome) -> bytes:
    detections = [{"label": d.label, "score": d.score, "box": [d.box.x1, d.box.y1, d.box.x2, d.box.y2],
                   "attributes": {a.model: a.label for a in d.attributes}} for d in outcome.detections]  # fmt: skip
    doc = {"status": int(outcome.code), "message": outcome.message, "width": outcome.width,
           "height": outcome.height, "detections": detections}  # fmt: skip
    return json.dumps(doc, separators=(",", ":")).encode()


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}
        from infer_server.stage.worker import limit_threads

        limit_threads(1)  # one instance per core, as the server's workers
        from infer_server.messages import ImageRef
        from infer_server.settings import ServerSettings
        from infer_server.stage.pipeline import NullPipeline, VisionPipeline

        self._ref = ImageRef
        null = params["null_model"] == "1"
        options = ServerSettings(batch_size=int(params["batch_size"]), null_model=null).worker_options()
        if null:
            self.pipeline = NullPipeline(options)
        else:
            self.pipeline = VisionPipeline.load(params["models"], options)
            self.pipeline.warm_up()

    def execute(self, requests):
        images = [pb_utils.get_input_tensor_by_name(r, "IMAGES").as_numpy().reshape(-1) for r in requests]
        flat = [(self._ref(k, 0, len(data)), data) for k, data in enumerate(d for each in images for d in each)]
        outcomes = {o.index: o for o in self.pipeline.process("peer", flat)}
        responses, k = [], 0
        for each in images:
            mine = [outcomes[k + i] for i in range(len(each))]
            k += len(each)
            docs = np.array([_document(o) for o in mine], dtype=np.object_).reshape(-1, 1)
            codes = np.array([int(o.code) for o in mine], dtype=np.int32).reshape(-1, 1)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("DETECTIONS", docs), pb_utils.Tensor("STATUS", codes)]))  # fmt: skip
        return responses
