"""The CPU image, built and run; the GPU Dockerfile, the compose file and the chart, validated.

Run by ``make image-test`` (``docker/image-test.sh`` installs podman, the validators and the base
image first, and sets ``CONTAINERS_CONF``). Nothing here is skipped: a check that cannot run fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engines.scenes import write_scenes
from infer_client import InferClient
from tests.integration.conftest import running_server

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
CHART = ROOT / "deploy" / "helm"
IMAGE = f"localhost/infer-server:cpu-test-{uuid.uuid4().hex[:8]}"
UID = 10001
TOOLS = ROOT / ".venv-image" / "bin"


def run(*cmd: str, timeout: float = 120, check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd[:6])} … exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done


def podman(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return run("podman", *args, **kwargs)


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    cert = "/etc/ssl/certs/ca-certificates.crt"  # an inspecting proxy's CA, for the build only
    mount = (
        ["-v", f"{cert}:/run/host-ca.crt:ro", "--build-arg", "PIP_CERT=/run/host-ca.crt"]
        if os.path.exists(cert)
        else []
    )
    started = time.monotonic()
    # --format docker: OCI images have no HEALTHCHECK, and podman builds OCI by default.
    dockerfile = str(DOCKER / "Dockerfile.cpu")
    build = ["build", "--format", "docker", "--network", "host", *mount, "-f", dockerfile, "-t", IMAGE, str(ROOT)]
    podman(*build, timeout=1800)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"\nimage {IMAGE}: built in {time.monotonic() - started:.0f} s, {size / 1e6:.0f} MB")
    yield IMAGE
    podman("rmi", "-f", IMAGE, check=False)


def test_dockerfiles_pass_hadolint() -> None:
    for dockerfile in ("Dockerfile.cpu", "Dockerfile.gpu"):
        done = run(
            str(TOOLS / "hadolint"), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKER / dockerfile), check=False
        )
        assert done.returncode == 0, f"{dockerfile}:\n{done.stdout}{done.stderr}"


def test_the_two_dockerfiles_share_their_instructions() -> None:
    """Dockerfile.gpu is Dockerfile.cpu with what a GPU needs: everything else is the same text."""

    def instructions(name: str) -> list[str]:
        text = re.sub(r"\\\n\s*", " ", (DOCKER / name).read_text())
        return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]

    cpu, gpu = instructions("Dockerfile.cpu"), instructions("Dockerfile.gpu")
    shared = [line for line in cpu if line in gpu]
    assert len(shared) >= 0.6 * len(cpu), f"only {len(shared)} of {len(cpu)} instructions shared"
    for must in ("USER 10001:10001", 'ENTRYPOINT ["tini", "--", "infer-server", "serve"]', "EXPOSE 8001"):
        assert must in cpu and must in gpu


def test_compose_file_is_valid() -> None:
    compose = next(Path(p) for p in (TOOLS.parent / "lib").glob("python3*/site-packages/compose/docker-compose"))
    done = run(str(compose), "-f", str(DOCKER / "compose.yaml"), "--profile", "gpu", "config", "-q", check=False)
    assert done.returncode == 0, done.stderr
    schema = run(
        str(TOOLS / "check-jsonschema"),
        "--builtin-schema",
        "vendor.compose-spec",
        str(DOCKER / "compose.yaml"),
        check=False,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr
    rendered = run(
        str(compose), "-f", str(DOCKER / "compose.yaml"), "--profile", "gpu", "config", "--format", "json"
    ).stdout
    services = json.loads(rendered)["services"]
    assert services["app"]["depends_on"]["server"]["condition"] == "service_healthy"
    socket = services["server"]["environment"]["INFER_LOCAL_SOCKET"]
    assert f"--local-socket {socket}" in " ".join(services["app"]["command"]) and socket.startswith("/shared/")
    assert {services[s]["user"] for s in services} == {f"{UID}:{UID}"}
    devices = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def render_chart(*values: str, sets: tuple[str, ...] = ()) -> str:
    args = [a for v in values for a in ("-f", str(CHART / "infer-server" / v))] + [
        a for s in sets for a in ("--set", s)
    ]
    return run(str(TOOLS / "python"), str(CHART / "render.py"), *args).stdout


@pytest.mark.parametrize("values", [("values.yaml",), ("values.yaml", "values-gpu.yaml")], ids=["cpu", "gpu"])
@pytest.mark.parametrize("kubernetes", ["1.25.0", "1.37.0"])  # the oldest and newest schemas bundled
def test_chart_renders_and_validates_strictly(values: tuple[str, ...], kubernetes: str, tmp_path: Path) -> None:
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(render_chart(*values, sets=("server.tokensSecret=infer-tokens",)))
    done = run(str(TOOLS / "kubernetes-validate"), "--strict", "-k", kubernetes, str(manifests), check=False)
    assert done.returncode == 0 and "WARN" not in done.stdout + done.stderr, done.stdout + done.stderr
    kinds = re.findall(r"^kind: (\w+)", manifests.read_text(), flags=re.M)
    assert sorted(kinds) == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service"]
    text = manifests.read_text()
    assert text.count(f"runAsUser: {UID}") == 1 and "medium: Memory" in text and "appProtocol: grpc" in text
    assert ("nvidia.com/gpu: 1" in text) == ("values-gpu.yaml" in values)
    words = " ".join(text.split())
    assert 'name: INFER_LOCAL_SOCKET value: "/shared/local.sock"' in words, "the sidecar's socket"
    assert "--local-socket /shared/local.sock" in words


def test_the_local_socket_can_be_turned_off() -> None:
    assert "INFER_LOCAL_SOCKET" not in render_chart("values.yaml", sets=("server.localSocket=",))


def test_the_validator_catches_a_mistake(tmp_path: Path) -> None:
    """A control: the strict validation above would fail on a misspelt key."""
    manifests = tmp_path / "manifests.yaml"
    manifests.write_text(render_chart("values.yaml").replace("readinessProbe:", "readinesProbe:"))
    assert run(str(TOOLS / "kubernetes-validate"), "--strict", str(manifests), check=False).returncode != 0


def test_the_optional_service_monitor_renders(tmp_path: Path) -> None:
    text = render_chart("values.yaml", sets=("serviceMonitor.enabled=true",))
    assert "kind: ServiceMonitor" in text and "port: metrics" in text  # a CRD: no bundled schema to check it with


@pytest.mark.timeout(1800)  # the first test to ask for the image builds it
def test_the_image_runs_as_non_root_without_build_tools(image: str) -> None:
    assert podman("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == str(UID)
    found = podman("run", "--rm", "--entrypoint", "sh", image, "-c", "command -v gcc cc g++ pip pip3 || true").stdout
    assert found.strip() == "", f"build tools in the final image: {found}"


@pytest.fixture
def shared() -> Iterator[Path]:
    """A host tmpfs directory both containers mount at /shared, owned by the image's user."""
    path = Path(tempfile.mkdtemp(prefix="infer-image-", dir="/dev/shm"))
    os.chown(path, UID, UID)
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """What must be identical: everything but timings and which worker answered."""
    return {k: v for k, v in result.items() if k not in ("timings_ms", "worker", "batch_id")}


@pytest.mark.timeout(1800)
def test_server_and_client_containers_answer_like_the_host(
    image: str, shared: Path, model_repo_dir: Path, tmp_path: Path
) -> None:
    scenes = tmp_path / "scenes"
    write_scenes(scenes, list(range(4100, 4106)), width=1280, height=720)
    tmp_path.chmod(0o755)
    scenes.chmod(0o755)
    files = sorted(p.name for p in scenes.glob("*.jpg"))
    name = f"infer-test-{uuid.uuid4().hex[:8]}"
    podman("run", "-d", "--name", name, "-v", f"{shared}:/shared", "-e", "INFER_LOCAL_SOCKET=/shared/local.sock",
           image, "--workers", "1", "--batch-size", "4")  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while podman("healthcheck", "run", name, check=False).returncode != 0:
            assert time.monotonic() < deadline, podman("logs", name, check=False).stderr[-3000:]
            time.sleep(2)
        assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
        client = podman(
            "run", "--rm", "--network", f"container:{name}", "-v", f"{shared}:/shared", "-v", f"{scenes}:/scenes:ro",
            "--entrypoint", "infer-client", image, "detect", "--json", "--server", "127.0.0.1:8001",
            "--shm-dir", "/shared/infer", "--transport", "tmpfs", "--local-socket", "/shared/local.sock",
            *(f"/scenes/{f}" for f in files),
        )  # fmt: skip
        in_container = [comparable(json.loads(line)) for line in client.stdout.splitlines()]
        podman("stop", "--time", "60", name)
        state = json.loads(podman("inspect", name).stdout)[0]["State"]
        logs = podman("logs", name).stderr
    finally:
        podman("rm", "-f", name, check=False)
    assert state["ExitCode"] == 0, logs[-3000:]
    assert '"event":"draining"' in logs and '"event":"stopped"' in logs
    assert '"peer":"local:pid=' in logs, "the client container's session came by the local socket"
    assert list(shared.iterdir()) == [shared / "infer"], "the socket is gone with the server"
    assert list((shared / "infer").iterdir()) == []
    with running_server(model_repo_dir, workers=1) as host, InferClient(host.address, shm_dir=host.shm_dir) as c:
        on_host = [comparable(r.to_dict()) for r in c.detect([str(scenes / f) for f in files])]
    assert len(in_container) == len(files) and all(r["status"]["code"] == 0 for r in in_container)
    assert sum(len(r["detections"]) for r in in_container) > 0
    assert in_container == on_host, "the container's answers differ from the host's"


KSERVE = ROOT / "deploy" / "kserve" / "servingruntime.yaml"


@pytest.mark.parametrize("kubernetes", ["1.25.0", "1.37.0"])
def test_the_kserve_runtime_is_a_valid_pod_that_speaks_grpc_v2(kubernetes: str, tmp_path: Path) -> None:
    """KServe's CRDs are not in the validator's schemas: the runtime's pod part (containers, volumes)
    is validated strictly as the Pod it becomes; the rest is checked against what KServe reads."""
    runtime, service = yaml.safe_load_all(KSERVE.read_text())
    assert (runtime["apiVersion"], runtime["kind"]) == ("serving.kserve.io/v1alpha1", "ServingRuntime")
    spec = runtime["spec"]
    assert spec["protocolVersions"] == ["grpc-v2"] and spec["supportedModelFormats"][0]["name"] == "infer-pipeline"
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container" and container["ports"][0]["name"] == "h2c"
    assert service["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "runtime"},
           "spec": {"containers": spec["containers"], "volumes": spec["volumes"]}}  # fmt: skip
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(yaml.safe_dump(pod))
    done = run(str(TOOLS / "kubernetes-validate"), "--strict", "-k", kubernetes, str(manifest), check=False)
    assert done.returncode == 0 and "WARN" not in done.stdout + done.stderr, done.stdout + done.stderr
