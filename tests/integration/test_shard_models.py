"""Models that change while a server of two shards serves (``--shards 2``): a change by call moves
every shard before it answers, one refused anywhere leaves every shard where it was, a shard
started again serves what the others serve, and what the shards saw (metrics, shadow runs) is
the whole server's."""

from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from benchmarks.procs import descendants
from benchmarks.servers import cmdline
from engines.scenes import generate_scene
from infer_client import InferClient, InferError, RoutedSession
from infer_client.local import CALL, ended_with, read_frames, start_frame
from infer_proto import infer_pb2
from infer_proto.framing import Kind, frame
from infer_proto.shards import shard_socket
from tests.helpers import MODELS, OpenWatch, versioned_repository
from tests.integration.conftest import RunningServer, running_server

# Its servers have their own local socket and shards, and their fronts change nothing it tests: the
# suite's --local-socket and --fronts passes would repeat it.
pytestmark = pytest.mark.skipif(
    "config.getoption('--local-socket') or config.getoption('--fronts')", reason="the same servers as without"
)

JPEGS = [generate_scene(seed, width=320, height=240).jpeg for seed in range(3)]


def _color_config() -> dict:  # type: ignore[type-arg]
    color = yaml.safe_load((MODELS / "color" / "config.yaml").read_text())
    color.pop("version", None)
    return color  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Color versions 1 and 2 on disk, the version policy choosing 1 (so that 2 serves only when an
    operator pins it)."""
    root = versioned_repository(tmp_path_factory.mktemp("shard-models"), (1, 2), {"specific": ["1"]})
    (root / "detector" / "profile.json").symlink_to(MODELS / "detector" / "profile.json")  # the drift watch's
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    path = tmp_path_factory.mktemp("shard-models-socket") / "local.sock"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        METRICS_PORT.append(s.getsockname()[1])
    args = ("--local-socket", str(path), "--shards", "2", "--shadow-budget", "1.0")
    args += ("--metrics-port", str(METRICS_PORT[0]), "--drift-interval-s", "0.2", "--drift-min-images", "6")
    with running_server(repo, *args, workers=2) as srv:
        srv.local_socket = path
        yield srv


METRICS_PORT: list[int] = []


def _sessions(client: InferClient) -> Iterator[RoutedSession]:
    """A session at home on each shard (shard 0 suggests each in turn)."""
    sessions: dict[int, RoutedSession] = {}
    while len(sessions) < 2:
        session = client.session()
        assert isinstance(session, RoutedSession)
        if session.home in sessions:
            session.close()
        else:
            sessions[session.home] = session
    return iter(sessions[home] for home in (0, 1))


def _colors(client: InferClient) -> dict[int, set[str]]:
    """The color version each shard answers with now."""
    answered = {}
    for session in _sessions(client):
        with session:
            answered[session.home] = {r.model_versions.get("color", "") for r in session.detect(JPEGS)}
    return answered


def _metrics() -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics").read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def test_a_change_by_call_moves_every_shard_before_it_answers(server: RunningServer) -> None:
    with server.client() as client:
        assert _colors(client) == {0: {"1"}, 1: {"1"}}
        client.models.load("color", "2")
        assert _colors(client) == {0: {"2"}, 1: {"2"}}
        client.models.unload("vehicle_type")
        for session in _sessions(client):
            with session:
                results = session.detect(JPEGS)
            assert all("vehicle_type" not in r.model_versions for r in results), f"shard {session.home}"
        client.models.load("vehicle_type")
        client.models.canary("color", "1", 1.0)  # the candidate answers every batch, on every shard
        assert _colors(client) == {0: {"1"}, 1: {"1"}}
        client.models.canary("color", "1", 0.0)
        client.models.rollback("color")  # to what served before the last change: 1
        assert _colors(client) == {0: {"1"}, 1: {"1"}}
        client.models.load("color", "2")
        assert {m.name: m.version for m in client.models.list()}["color"] == "2"


def test_a_shard_started_again_serves_the_models_chosen_before(server: RunningServer) -> None:
    with server.client() as client:
        client.models.load("color", "2")
        _colors(client)  # images answered by each shard
    answered = _metrics()['infer_images_total{code="OK"}']
    (shard,) = [pid for pid in descendants(server.process.pid) if b"infer_server.front.shards" in cmdline(pid)]
    with grpc.insecure_channel(server.address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        os.kill(shard, signal.SIGKILL)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
    with server.client() as client:
        # Its version policy alone would choose 1: it was told what the others serve.
        assert _colors(client) == {0: {"2"}, 1: {"2"}}
    # The shard counts from 0 again; what it had counted before is kept: no counter goes down.
    assert _metrics()['infer_images_total{code="OK"}'] == answered + 2 * len(JPEGS)


def test_a_change_one_shard_refuses_leaves_every_shard_where_it_was(server: RunningServer, repo: Path) -> None:
    """Version 3 loads in the main process and then, its config broken meanwhile, not in shard 1:
    the main process goes back, and the call is refused naming the shard."""
    folder = repo / "color" / "3"
    folder.mkdir()
    (folder / "model.onnx").symlink_to(MODELS / "color" / "model.onnx")
    (folder / "config.yaml").write_text(yaml.safe_dump(_color_config()))
    watch = OpenWatch(folder / "config.yaml")

    def break_after_the_main_process() -> None:
        # One worker each: the main process's candidate and its replacement read the config; the
        # next to read it is shard 1's candidate, a second or so later.
        for _ in range(2):
            assert watch.wait(60)
        (folder / "config.yaml").write_text("outputs: [unclosed\n")

    breaking = threading.Thread(target=break_after_the_main_process)
    with server.client() as client:
        client.models.load("color", "2")
        breaking.start()
        with pytest.raises(InferError) as refused:
            client.models.load("color", "3")
        breaking.join(60)
        watch.close()
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, str(refused.value)
        assert "shard 1" in refused.value.message and str(repo) not in refused.value.message
        assert {m.name: m.version for m in client.models.list()}["color"] == "2"
        assert _colors(client) == {0: {"2"}, 1: {"2"}}


def test_shadow_runs_and_metrics_count_every_shards_images(server: RunningServer) -> None:
    with server.client() as client:
        client.models.load("color", "2")
        before = _metrics().get('infer_images_total{code="OK"}', 0.0)
        client.models.shadow("color", "1", 1.0)
        answered = 0
        for session in _sessions(client):
            with session:
                for _ in range(3 if session.home else 1):  # most on shard 1
                    answered += len(session.detect(JPEGS))
        color = {m.name: m for m in client.models.list()}["color"]
        exported = _metrics()
        client.models.shadow("color", "1", 0.0)
    assert color.shadow_images > len(JPEGS), "shard 1's shadow runs (most of them) are counted too"
    assert color.shadow_detection_agreement == color.shadow_attribute_agreement == 1.0  # the same file
    assert exported['infer_images_total{code="OK"}'] - before == answered
    # Shadow runs follow the answers: the scrape, after the listing, may have seen one more.
    assert color.shadow_images <= exported['infer_shadow_images_total{model="color",version="1"}'] <= answered
    assert exported['infer_model_version{model="color",role="serving",version="2"}'] == 1, "once, not per shard"


def _unary(path: str, method: str, request: bytes) -> InferError | None:
    """One unary call on a local socket, by its frames: how it ended (None: OK)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.sendall(start_frame(method, ()))
        buffer, frames = bytearray(), []
        while not frames or frames[-1][0] != Kind.END:
            buffer += sock.recv(65536)
            for kind, payload in read_frames(buffer):
                frames.append((kind, payload))
                if kind == Kind.WANT:
                    sock.sendall(frame(CALL, Kind.MESSAGE, request) + frame(CALL, Kind.HALF_CLOSE))
    return ended_with(frames[-1][1])


def test_a_shard_refuses_a_change_made_on_its_own_socket(server: RunningServer) -> None:
    """Only the main process changes models: a change made in one shard alone would split them."""
    assert server.local_socket is not None
    request = infer_pb2.LoadModelRequest(name="color", version="1").SerializeToString()
    with server.client() as client:
        client.models.load("color", "2")
        refused = _unary(shard_socket(server.local_socket, 1), "/infer.v1.ModelControlService/LoadModel", request)
        assert refused is not None and refused.code == grpc.StatusCode.FAILED_PRECONDITION, refused
        assert "main process" in refused.message
        assert _colors(client) == {0: {"2"}, 1: {"2"}}
        # The main process's own socket takes it, for every shard.
        assert _unary(str(server.local_socket), "/infer.v1.ModelControlService/LoadModel", request) is None
        assert _colors(client) == {0: {"1"}, 1: {"1"}}


def test_the_drift_watch_judges_every_shards_images(server: RunningServer) -> None:
    """Images answered by shard 1 alone reach the server's drift window (``GetDrift``)."""
    with server.client() as client:
        before = client.models.drift().window_images
        home = next(s for s in _sessions(client) if s.home == 1 or s.close())
        with home:
            answered = sum(len(home.detect(JPEGS)) for _ in range(3))
            for _ in range(300):  # each answer is a wait: the window is judged every 0.2 s
                report = client.models.drift()
                if report.window_images >= before + answered:
                    break
                home.detect(JPEGS[:1])
    assert report.enabled and report.window_images >= before + answered, (before, report)
    assert report.statistics, "judged: the union holds more than --drift-min-images"
