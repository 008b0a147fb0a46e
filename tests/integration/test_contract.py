"""The public surfaces: a client built only from proto/infer.proto, and the infer-client CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
from grpc_tools import protoc

from engines.scenes import Scene
from tests.integration.conftest import RunningServer

REPO = Path(__file__).resolve().parents[2]
INFER_CLIENT = Path(sys.executable).with_name("infer-client")

PROTO_ONLY_CLIENT = textwrap.dedent(
    """
    import os, sys, uuid
    import grpc
    import infer_pb2, infer_pb2_grpc
    assert not {"infer_proto", "infer_client", "infer_server"} & set(sys.modules)
    target, shm_dir, image = sys.argv[1], sys.argv[2], open(sys.argv[3], "rb").read()
    with grpc.insecure_channel(target) as channel:
        stub = infer_pb2_grpc.InferenceServiceStub(channel)
        path = os.path.join(shm_dir, uuid.uuid4().hex + ".bin")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, image * 2)
        os.close(fd)
        requests = [
            infer_pb2.PushDataRequest(path=path, sizes=[len(image)] * 2, names=["a", "b"]),
            infer_pb2.PushDataRequest(data=image * 3, sizes=[len(image)] * 3),
        ]
        for request in requests:
            reply = stub.PushData(request, timeout=30)
            pull = infer_pb2.PullResultRequest(batch_ids=[reply.batch_id])
            results = list(stub.PullResult(pull, timeout=120))
            print(reply.image_count, sorted((r.index, r.name, r.status.code, r.width) for r in results))
        os.unlink(path)
    """
)


def test_client_from_the_proto_alone(server: RunningServer, scenes: list[Scene], tmp_path: Path) -> None:
    out = tmp_path / "stubs"
    out.mkdir()
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{REPO / 'proto'}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                "infer.proto",
            ]
        )
        == 0
    )
    (out / "client.py").write_text(PROTO_ONLY_CLIENT)
    image = tmp_path / "scene.jpg"
    image.write_bytes(scenes[0].jpeg)
    env = {**os.environ, "PYTHONPATH": str(out)}
    proc = subprocess.run(
        [sys.executable, str(out / "client.py"), server.address, str(server.shm_dir), str(image)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=out,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    w = scenes[0].width
    assert proc.stdout.splitlines() == [
        f"2 [(0, 'a', 0, {w}), (1, 'b', 0, {w})]",
        f"3 [(0, '', 0, {w}), (1, '', 0, {w}), (2, '', 0, {w})]",
    ]


def _write_scenes(directory: Path, scenes: list[Scene]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        paths.append(directory / f"scene{i}.jpg")
        paths[-1].write_bytes(scene.jpeg)
    return paths


def test_cli_detect_json_and_annotate(server: RunningServer, scenes: list[Scene], tmp_path: Path) -> None:
    paths = _write_scenes(tmp_path / "in", scenes[:3])
    cmd = [str(INFER_CLIENT), "detect", "--server", server.address, "--shm-dir", str(server.shm_dir)]
    proc = subprocess.run(
        [*cmd, "--json", "--annotate", str(tmp_path / "ann"), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(d["index"], d["name"], d["status"]["code"]) for d in lines] == [
        (0, "scene0.jpg", 0),
        (1, "scene1.jpg", 0),
        (2, "scene2.jpg", 0),
    ]
    for d, scene in zip(lines, scenes, strict=False):
        assert (d["width"], d["height"]) == (scene.width, scene.height)
        for det in d["detections"]:
            assert set(det["box"]) == {"x1", "y1", "x2", "y2"}
            assert all(set(a) == {"label", "score"} for a in det["attributes"].values())
    for path, scene in zip(paths, scenes, strict=False):
        annotated = cv2.imread(str(tmp_path / "ann" / path.name))
        assert annotated is not None and annotated.shape[:2] == (scene.height, scene.width)
    table = subprocess.run([*cmd, str(paths[0])], capture_output=True, text=True, timeout=180)
    assert table.returncode == 0 and "scene0.jpg" in table.stdout and "OK" in table.stdout


def test_cli_batch_directory(server: RunningServer, scenes: list[Scene], tmp_path: Path) -> None:
    paths = _write_scenes(tmp_path / "in" / "nested", scenes[:5])
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [
            str(INFER_CLIENT),
            "batch",
            str(tmp_path / "in"),
            "--server",
            server.address,
            "--shm-dir",
            str(server.shm_dir),
            "--out",
            str(out),
            "--chunk",
            "2",
            "--max-in-flight",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == sorted(map(str, paths))
    assert all(r["status"]["code"] == 0 for r in rows)
    assert all(r["width"] > 0 for r in rows)
