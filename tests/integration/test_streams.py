"""Streams a client holds and no longer serves: a frozen client's streams come back to the server.

Finding: 256 idle Session streams from one process locked everyone out, health checks included.
Streams are now bounded per caller and per server, an idle Session ends after
``--stream-idle-timeout-s`` (tests/integration/test_identity.py), and the server pings the
connections that hold calls: a client that stops answering (frozen, or its host gone) loses its
connection after ``--keepalive-s`` + ``--keepalive-timeout-s``, and its streams with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc

from infer_proto import infer_pb2_grpc
from tests.integration.conftest import running_server

HOLDER = """
import os, queue, signal, sys
import grpc
from infer_proto import infer_pb2, infer_pb2_grpc
channel = grpc.insecure_channel(sys.argv[1])
requests = queue.SimpleQueue()
requests.put(infer_pb2.SessionRequest(tag=1))  # an empty push: answered in-band, the stream goes on
call = infer_pb2_grpc.InferenceServiceStub(channel).Session(iter(requests.get, None))
next(call)  # answered: the server runs this stream
print("holding", flush=True)
os.kill(os.getpid(), signal.SIGSTOP)  # frozen: no more answers to the server's pings
"""


def test_a_frozen_clients_stream_is_taken_back(model_repo_dir: Path) -> None:
    args = ("--null-model", "--max-streams", "1", "--keepalive-s", "1", "--keepalive-timeout-s", "1")
    with running_server(model_repo_dir, *args, workers=1) as server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, server.address], stdout=subprocess.PIPE, env=env)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
            with grpc.insecure_channel(server.address) as channel:
                stub = infer_pb2_grpc.InferenceServiceStub(channel)
                refused = 0
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    try:
                        list(stub.Session(iter(()), timeout=10))  # opens and ends at once when a slot is free
                        break
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                        refused += 1
                        time.sleep(0.2)
                else:
                    raise AssertionError("the frozen client kept its stream")
            assert refused > 0, "the frozen client did hold the only slot at first"
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
