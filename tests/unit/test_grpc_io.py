"""gRPC's I/O path default for the server and same-host clients (infer_proto.grpc_io)."""

import importlib.metadata

import pytest

from infer_proto.grpc_io import EPOLL_IO, prefer_epoll_io

pytestmark = pytest.mark.unit


def _measured_release() -> bool:
    major, minor = (int(v) for v in importlib.metadata.version("grpcio").split(".")[:2])
    return (1, 80) <= (major, minor) < (1, 90)


@pytest.mark.skipif(not _measured_release(), reason="the default applies to the measured grpcio releases only")
def test_sets_the_epoll_path_before_grpc_is_imported() -> None:
    environ: dict[str, str] = {"PATH": "/bin"}
    assert prefer_epoll_io(environ, modules={}) is True
    assert environ == {"PATH": "/bin", "GRPC_EXPERIMENTS": EPOLL_IO}


@pytest.mark.parametrize("value", ["", "event_engine_client"])
def test_an_explicit_choice_wins(value: str) -> None:
    environ = {"GRPC_EXPERIMENTS": value}
    assert prefer_epoll_io(environ, modules={}) is False
    assert environ == {"GRPC_EXPERIMENTS": value}


def test_too_late_once_grpc_is_imported() -> None:
    environ: dict[str, str] = {}
    assert prefer_epoll_io(environ, modules={"grpc": object()}) is False
    assert environ == {}
