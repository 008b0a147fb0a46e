"""Client of the REST/JSON baseline: one keep-alive HTTP/1.1 connection, base64 images in a JSON body.

Used by the benchmark's load generator (``benchmarks.loadgen``), one client per simulated client
thread, the way ``InferClient`` is used for the gRPC transports. The encoding work (base64 + JSON)
is done here, in the client's process, because that is what a REST client pays.
"""

from __future__ import annotations

import base64
import http.client
import json
from collections.abc import Sequence
from typing import Any

INFER_PATH = "/v1/infer"


class RestError(RuntimeError):
    """The baseline answered something other than 200."""


class RestClient:
    def __init__(self, address: str, timeout: float = 120.0) -> None:
        host, port = address.rsplit(":", 1)
        self._conn = http.client.HTTPConnection(host, int(port), timeout=timeout)

    def infer(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Every image's result dict (``ImageResult.to_dict`` shape), ordered by index."""
        names = names or [""] * len(images)
        body = json.dumps(
            {
                "images": [
                    {"name": n, "data": base64.b64encode(b).decode("ascii")} for n, b in zip(names, images, strict=True)
                ]
            }
        ).encode()
        self._conn.request("POST", INFER_PATH, body, {"Content-Type": "application/json"})
        response = self._conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RestError(f"HTTP {response.status}: {data[:200]!r}")
        results: list[dict[str, Any]] = json.loads(data)["results"]
        return results

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> RestClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
