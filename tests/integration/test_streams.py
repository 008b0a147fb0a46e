"""Streams a client holds and no longer serves: a frozen client's streams come back to the server.

Finding: 256 idle Session streams from one process locked everyone out, health checks included.
Streams are now bounded per caller and per server, an idle Session ends after
``--stream-idle-timeout-s`` (tests/integration/test_identity.py), and the server pings the
connections that hold calls: a client that stops answering (frozen, or its host gone) loses its
connection after ``--keepalive-s`` + ``--keepalive-timeout-s``, and its streams with it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

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


def connection_of(pid: int, port: int) -> socket.socket:
    """A duplicate (``pidfd_getfd``) of process ``pid``'s TCP connection to ``port``."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            if not os.readlink(entry).startswith("socket:"):
                continue
            fd = libc.syscall(438, pidfd, int(entry.name), 0)  # SYS_pidfd_getfd
            if fd < 0:
                raise OSError(ctypes.get_errno(), "pidfd_getfd")
            sock = socket.socket(fileno=fd)
            if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.getpeername()[1] == port:
                return sock
            sock.close()
    finally:
        os.close(pidfd)
    raise AssertionError(f"process {pid} has no connection to port {port}")


def drained(sock: socket.socket, timeout: float) -> bool:
    """Read what the peer sends (its pings) until it closes the connection; False at ``timeout``."""
    sock.settimeout(timeout)
    with sock:
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        except TimeoutError:
            return False
    return True


def test_a_frozen_clients_stream_is_taken_back(model_repo_dir: Path) -> None:
    args = ("--null-model", "--max-streams", "1", "--keepalive-s", "1", "--keepalive-timeout-s", "1")
    with running_server(model_repo_dir, *args, workers=1) as server:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, server.address], stdout=subprocess.PIPE, env=env)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
            with grpc.insecure_channel(server.address) as channel:
                stub = infer_pb2_grpc.InferenceServiceStub(channel)
                with pytest.raises(grpc.RpcError) as held:
                    list(stub.Session(iter(()), timeout=10))
                assert held.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "the frozen client holds the slot"
                # The server drops the connection of a client that stops answering its pings: its
                # socket (taken from the frozen process) reaches EOF.
                assert drained(connection_of(holder.pid, int(server.address.rsplit(":", 1)[1])), timeout=30)
                for _ in range(1000):  # each refusal is a round trip: the slot goes with the call
                    try:
                        list(stub.Session(iter(()), timeout=10))  # opens and ends at once when a slot is free
                        break
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                else:
                    raise AssertionError("the frozen client kept its stream")
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
