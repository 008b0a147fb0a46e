"""Models that change while the server serves: reloads under load lose and fail nothing, a version
that does not load is refused while the old one serves on, rollback is one call, and a polled
repository is followed without a call."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engines.scenes import generate_scene
from infer_client import InferClient, InferError
from tests.helpers import MODELS, versioned_repository
from tests.integration.conftest import RunningServer, running_server

JPEGS = [generate_scene(seed, width=320, height=240).jpeg for seed in range(4)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return versioned_repository(tmp_path_factory.mktemp("lifecycle"), (1, 2), {"latest": 1})


METRICS_PORT: list[int] = []


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[RunningServer]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        METRICS_PORT.append(s.getsockname()[1])
    args = ("--shadow-budget", "1.0", "--metrics-port", str(METRICS_PORT[0]))
    with running_server(repo, *args, workers=2) as srv:
        yield srv


def metrics() -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics").read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line[:1] != "#"}


def serving(client: InferClient) -> dict[str, str]:
    return {m.name: m.version for m in client.models.list() if m.state == "READY"}


class Load:
    """Batches pushed back to back from a thread, and the health statuses seen meanwhile."""

    def __init__(self, server: RunningServer) -> None:
        self.results: list[tuple[str, int, bool, str]] = []  # batch id, index, ok, color version
        self.statuses: list[int] = []
        self.pushed = 0
        self._stop = threading.Event()
        self._client = server.client()
        self._health = grpc.insecure_channel(server.address)  # a channel of its own for the health watch
        self._threads = [threading.Thread(target=self._push), threading.Thread(target=self._watch)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _push(self) -> None:
        while not self._stop.is_set():
            self.pushed += len(JPEGS)
            for r in self._client.detect(JPEGS):
                self.results.append((r.batch_id, r.index, r.ok, r.model_versions.get("color", "")))

    def _watch(self) -> None:
        stream = health_pb2_grpc.HealthStub(self._health).Watch(health_pb2.HealthCheckRequest(service=""))
        self._stream = stream
        try:
            for reply in stream:
                self.statuses.append(reply.status)
        except grpc.RpcError:
            pass  # cancelled at the end

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._threads[0].join(120)
        self._stream.cancel()
        self._threads[1].join(10)
        self._client.close()
        self._health.close()


def test_a_reload_under_load_answers_every_image_once_and_health_stays_serving(server: RunningServer) -> None:
    with server.client() as admin:
        assert serving(admin)["color"] == "2"
        blips = metrics().get('infer_health_changes_total{status="NOT_SERVING"}', 0.0)
        with Load(server) as load:
            admin.models.load("color", "1")
            assert serving(admin)["color"] == "1"
            admin.models.rollback("color")  # one call back to what served before
            assert serving(admin)["color"] == "2"
        assert load.pushed == len(load.results) == len({(b, i) for b, i, _, _ in load.results})
        assert all(ok for _, _, ok, _ in load.results), "a model change failed no image"
        assert {v for _, _, _, v in load.results} == {"1", "2"}, "both versions answered while they served"
        assert load.statuses and set(load.statuses) == {health_pb2.HealthCheckResponse.SERVING}
        assert metrics().get('infer_health_changes_total{status="NOT_SERVING"}', 0.0) == blips, "not even a blip"
        listed = {m.name: m for m in admin.models.list()}
        assert (listed["color"].version, listed["color"].pinned, listed["color"].previous) == ("2", "2", "1")


def _version(repo: Path, version: int, config: dict | None = None, onnx: bytes | None = None) -> None:  # type: ignore[type-arg]
    folder = repo / "color" / str(version)
    folder.mkdir()
    if onnx is None:
        (folder / "model.onnx").symlink_to(MODELS / "color" / "model.onnx")
    else:
        (folder / "model.onnx").write_bytes(onnx)
    if config is not None:
        (folder / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    ("version", "why"),
    [
        (3, "Protobuf parsing failed"),  # a corrupt model file
        (4, "outputs"),  # a config without a key it needs
        (5, "spaceship"),  # labels the pipeline cannot route
        (6, "invalid dimensions"),  # an input size the model does not take
    ],
)
def test_a_version_that_does_not_load_is_refused_and_the_old_one_serves(
    server: RunningServer, repo: Path, version: int, why: str
) -> None:
    color = yaml.safe_load((MODELS / "color" / "config.yaml").read_text())
    color.pop("version", None)
    broken = {
        3: lambda: _version(repo, 3, onnx=b"\x08\x01 not an onnx file"),
        4: lambda: _version(repo, 4, {k: v for k, v in color.items() if k != "outputs"}),
        5: lambda: _version(repo, 5, {**color, "applies_to": ["spaceship"]}),
        6: lambda: _version(repo, 6, {**color, "input": {**color["input"], "width": 97, "height": 31}}),
    }
    broken[version]()
    with server.client() as client:
        before = serving(client)
        with pytest.raises(InferError) as refused:
            client.models.load("color", str(version))
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, str(refused.value)
        assert "refused" in str(refused.value) and why in str(refused.value)
        assert str(repo) not in str(refused.value), "the repository's place on the host does not show"
        assert serving(client) == before, "the serving version serves on"
        assert len(server.worker_pids()) == 2, "the extra worker that tried is gone"
        assert [m.last_error for m in client.models.list() if m.name == "color"][0], "the reason is listed"
        results = client.detect(JPEGS)
    assert all(r.ok and r.model_versions["color"] == before["color"] for r in results)


def test_unknown_models_and_versions_and_the_detector_are_refused(server: RunningServer) -> None:
    with server.client() as client:
        for call, code in [
            (lambda: client.models.load("nonesuch"), grpc.StatusCode.NOT_FOUND),
            (lambda: client.models.load("color", "99"), grpc.StatusCode.NOT_FOUND),
            (lambda: client.models.unload("detector"), grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: client.models.rollback("vehicle_type"), grpc.StatusCode.FAILED_PRECONDITION),
        ]:
            with pytest.raises(InferError) as refused:
                call()
            assert refused.value.code == code, str(refused.value)


def test_an_unloaded_attribute_model_stops_answering_and_loads_back(server: RunningServer) -> None:
    with server.client() as client:
        client.models.unload("vehicle_type")
        assert "vehicle_type" not in serving(client)
        unloaded = client.detect(JPEGS)
        client.models.load("vehicle_type")
        loaded = client.detect(JPEGS)
    names = {m for r in unloaded for d in r.detections for m in d.attributes}
    assert "vehicle_type" not in names and all("vehicle_type" not in r.model_versions for r in unloaded)
    assert {m for r in loaded for d in r.detections for m in d.attributes} >= {"vehicle_type"}


def _candidate(repo: Path, version: int) -> None:
    """A candidate color model that names its colours in reverse: same boxes, other attributes."""
    if not (repo / "color" / str(version)).exists():
        color = yaml.safe_load((MODELS / "color" / "config.yaml").read_text())
        color.pop("version", None)
        _version(repo, version, {**color, "labels": color["labels"][::-1]})


def test_a_canary_answers_its_share_and_is_promoted_with_one_call(server: RunningServer, repo: Path) -> None:
    _candidate(repo, 7)
    with server.client() as client:
        listed = {m.name: m for m in client.models.canary("color", "7", 0.3)}
        assert (listed["color"].version, listed["color"].candidate, listed["color"].canary_share) == ("2", "7", 0.3)
        ids = [client.push(JPEGS[:1]) for _ in range(160)]
        answered = [r.model_versions["color"] for r in client.pull(ids)]
        share = answered.count("7") / len(answered)
        # 160 draws of p = 0.3: sd 0.036; the bounds are ±4 sd.
        assert len(answered) == 160 and set(answered) == {"2", "7"} and 0.155 <= share <= 0.445, share
        client.models.canary("color", "7", 0.5)  # a share alone changes at once
        promoted = {m.name: m for m in client.models.load("color", "7")}
        assert (promoted["color"].version, promoted["color"].candidate) == ("7", ""), "promoted: the trial ended"
        assert {r.model_versions["color"] for r in client.detect(JPEGS)} == {"7"}
        client.models.rollback("color")
        assert serving(client)["color"] == "2"


def test_shadow_results_never_reach_a_client_and_their_agreement_is_measured(
    server: RunningServer, repo: Path
) -> None:
    _candidate(repo, 7)
    with server.client() as client:
        # Version 1 is the serving model's very file and config: it must agree everywhere.
        client.models.shadow("color", "1", 1.0)
        same = [r for _ in range(6) for r in client.detect(JPEGS)]
        twin = [m for m in client.models.list() if m.name == "color"][0]
        client.models.shadow("color", "7", 1.0)  # another candidate replaces it
        other = [r for _ in range(6) for r in client.detect(JPEGS)]
        reverse = [m for m in client.models.list() if m.name == "color"][0]
        exported = metrics()
        ended = {m.name: m for m in client.models.shadow("color", "7", 0.0)}
    assert all(r.ok and r.model_versions["color"] == "2" for r in same + other), "only the serving version answers"
    assert twin.shadow_images > 0 and twin.shadow_detection_agreement == twin.shadow_attribute_agreement == 1.0
    assert reverse.shadow_images > 0 and reverse.shadow_detection_agreement == 1.0
    assert reverse.shadow_attribute_agreement < 0.9, "a candidate that names colours otherwise disagrees"
    assert ended["color"].candidate == "" and ended["color"].version == "2"
    assert exported['infer_shadow_images_total{model="color",version="7"}'] == reverse.shadow_images
    agree = exported['infer_shadow_attributes_agree_total{model="color",version="7"}']
    assert agree / exported['infer_shadow_attributes_compared_total{model="color",version="7"}'] < 0.9
    assert exported['infer_model_version{model="color",role="candidate",version="7"}'] == 1
    assert exported['infer_trial_share{mode="shadow",model="color",version="7"}'] == 1.0
    assert exported['infer_model_inference_success_total{model="color",version="2"}'] >= len(same + other)


def test_a_polled_repository_is_followed_without_a_call(tmp_path: Path) -> None:
    repo = versioned_repository(tmp_path, (1,), {"latest": 1})
    with running_server(repo, "--repository-poll-s", "0.2", workers=1) as server, server.client() as client:
        assert client.detect(JPEGS[:1])[0].model_versions["color"] == "1"
        _version(repo, 2)
        # Each answer is a wait: the new version shows once the poll has moved the worker.
        for _ in range(2000):
            if client.detect(JPEGS[:1])[0].model_versions["color"] == "2":
                break
        assert serving(client)["color"] == "2"


def test_the_cli_lists_loads_and_rolls_back(server: RunningServer) -> None:
    cli = [str(Path(sys.executable).with_name("infer-client")), "models"]

    def run(*args: str) -> tuple[int, dict[str, dict[str, object]]]:
        done = subprocess.run([*cli, *args, "-s", server.address, "--json"], capture_output=True, text=True)
        models = [json.loads(line) for line in done.stdout.splitlines()]
        return done.returncode, {m["name"]: m for m in models}

    code, listed = run("list")
    assert code == 0 and listed["detector"]["state"] == "READY" and "1" in listed["color"]["versions"]
    code, changed = run("load", "color", "1")
    assert code == 0 and changed["color"]["version"] == "1"
    code, changed = run("rollback", "color")
    assert code == 0 and changed["color"]["version"] != "1"
    refused = subprocess.run([*cli, "unload", "detector", "-s", server.address], capture_output=True, text=True)
    assert refused.returncode == 2 and "FAILED_PRECONDITION" in refused.stderr


def test_a_change_whose_call_is_cancelled_is_still_made_and_recorded(server: RunningServer) -> None:
    with server.client() as client:
        with pytest.raises(InferError) as cut:
            client.models.load("color", "1", timeout=0.3)  # a change takes seconds
        assert cut.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(2000):  # each answer is a wait: the change goes on without its caller
            if [m.pinned for m in client.models.list() if m.name == "color"] == ["1"]:
                break
            client.detect(JPEGS[:1])
        listed = {m.name: m for m in client.models.list()}
        assert (listed["color"].version, listed["color"].previous) == ("1", "2"), "made and recorded"
        client.models.rollback("color")
    log = server.log_path.read_text()
    assert '"event":"model load started"' in log and '"event":"model load","model":"color"' in log


def test_a_change_an_old_worker_does_not_make_way_for_is_made_and_said_so(model_repo_dir: Path) -> None:
    """Finding: a timed-out change left its extra worker serving for good, on options the caller
    was told were refused."""
    # Two workers of one pool, whatever pytest's --shards says (with one worker per shard, both go).
    args = ("--null-model", "--reload-timeout-s", "5", "--shards", "1")
    with running_server(model_repo_dir, *args, workers=2) as server:
        old = server.worker_pids()
        for pid in old:
            os.kill(pid, signal.SIGSTOP)  # frozen: they never take the stop marker
        try:
            with server.client() as client, pytest.raises(InferError) as slow:
                client.models.load()
        finally:
            for pid in old:
                os.kill(pid, signal.SIGCONT)
        assert slow.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "is made" in str(slow.value)
        with server.client() as client:
            assert all(r.ok for r in client.detect(JPEGS))
            # The thawed retiring worker goes and is replaced, the other stays; the extra one is gone.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # each answer is a wait
                pids = server.worker_pids()
                if len(pids) == 2 and len(set(pids) & set(old)) == 1:
                    break
                client.detect(JPEGS[:1])
        pids = server.worker_pids()
        assert len(pids) == 2 and len(set(pids) & set(old)) == 1, (pids, old)


def test_every_metric_the_dashboard_graphs_is_exported(server: RunningServer) -> None:
    from benchmarks.dashboard import PANELS, Query

    with server.client() as client:
        client.detect(JPEGS[:1])  # a labelled histogram has no series before its first observation
    text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics").read().decode()
    names = {line.split("{")[0].split()[0] for line in text.splitlines() if line and line[0] != "#"}
    for line in text.splitlines():
        if line.startswith("# TYPE "):  # a family with no sample yet (no trial, no drift window)
            name, kind = line.split()[2:4]
            names |= {name, f"{name}_total"} if kind == "counter" else {name}

    def metrics_of(query: Query) -> list[str]:
        if query.kind == "ratio":
            assert query.of is not None and query.per is not None
            return metrics_of(query.of) + metrics_of(query.per)
        return [query.metric + ("_bucket" if query.kind == "quantile" else "")]

    wanted = {m for panel in PANELS for q in panel.queries for m in metrics_of(q)}
    assert wanted <= names, sorted(wanted - names)
