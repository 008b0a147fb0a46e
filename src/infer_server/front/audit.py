"""The audit log: one structured line per push and per control action, on the ``infer_server.audit``
logger (INFO), in the server's main process.

A push line says who (the caller's identity and the peer's address), what (transport,
image count, bytes, the request_id's presence), and the verdict: ``accepted`` with the batch id,
``retry`` (a request_id seen before, answered with the first batch id) or ``refused`` with the status
code and the client-facing reason. A call refused before its request was read (no or an unknown
token, no client certificate, a push over its caller's byte budget: ``front.gate``) leaves a
``call`` line with the method and the reason. No line
carries a secret, image data, or a path: a path names a client's file, and a refused one may name
anything on the host. Route the logger wherever the
operator keeps audit trails (it writes to the server's log, stderr, by default).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc

from infer_proto import infer_pb2

log = logging.getLogger("infer_server.audit")


def push(peer: str, identity: str, request: infer_pb2.PushDataRequest, verdict: str, *, batch_id: str = "",
         code: grpc.StatusCode = grpc.StatusCode.OK, reason: str = "") -> None:  # fmt: skip
    """One push and what became of it."""
    if not log.isEnabledFor(logging.INFO):
        return
    sizes = request.sizes
    if verdict == "refused":  # anything may be in it (even millions of sizes): what it holds
        inline = bool(request.data)
        size = len(request.data) if inline else sum(sizes) if len(sizes) <= 4096 else None
    else:  # admitted: its sizes were checked and add up to its data (every read of which copies it)
        inline, size = not request.path, sum(sizes)
    fields: dict[str, Any] = {
        "event": "push", "peer": peer, "identity": identity, "transport": "inline" if inline else "tmpfs",
        "images": len(sizes), "bytes": size,
        "request_id": bool(request.request_id), "verdict": verdict, "batch_id": batch_id or None,
    }  # fmt: skip
    if verdict == "refused":
        fields |= {"code": code.name, "reason": reason}
    log.info(json.dumps(fields, separators=(",", ":")))


def refused_call(peer: str, rpc: str, code: grpc.StatusCode, reason: str, identity: str | None = None) -> None:
    """A call refused before its request was read: no identity, or a push over its byte budget."""
    if log.isEnabledFor(logging.INFO):
        fields = {"event": "call", "peer": peer, "identity": identity, "rpc": rpc, "verdict": "refused",
                  "code": code.name, "reason": reason}  # fmt: skip
        log.info(json.dumps(fields, separators=(",", ":")))


def control(action: str, **details: Any) -> None:
    """A change of the server's state: started, draining, stopped, a worker replaced."""
    if log.isEnabledFor(logging.INFO):
        log.info(json.dumps({"event": action, **details}, separators=(",", ":")))
