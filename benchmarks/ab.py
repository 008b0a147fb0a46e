"""Interleaved A/B of two revisions on one point: is a change faster, beyond the VM's drift?

This VM's per-core speed drifts by ±15% over minutes, more than most single changes win, so two
sequential runs cannot tell them apart. This tool checks both revisions out side by side (``git
worktree``, gRPC stubs generated into each), then alternates A, B, B, A, A, B ... (the order flips
each round) running ``benchmarks.fps`` of that revision — its server, its client library, its
benchmark — on one point, and reports every round's B/A ratio and the means::

    .venv/bin/python -m benchmarks.ab HEAD~1 HEAD                    # null model, tmpfs, K=4, 5 rounds, ~2 min
    .venv/bin/python -m benchmarks.ab main my-branch --transport inline --concurrency 16 --rounds 7
    .venv/bin/python -m benchmarks.ab HEAD~1 HEAD --pipeline full --rounds 3   # with the models, ~10 min
    .venv/bin/python -m benchmarks.ab HEAD HEAD --b-args=--tokens             # one revision, auth off vs on
    .venv/bin/python -m benchmarks.ab HEAD~1 HEAD --oip oip-shm --concurrency 16 --a-args='--batch 1' \
        --b-args='--batch 1'                                     # the Open Inference Protocol with tritonclient

A revision is anything ``git rev-parse`` takes; ``WORKTREE`` (the working tree with its uncommitted
changes) compares the current files. Both revisions must have ``benchmarks/fps.py``. With
``--oip WAY`` the point is one way in of ``benchmarks.oip`` instead: this tree's benchmark drives
each revision's server, with tritonclient's clients or, for the v1 ways (``v1-local`` too), that
revision's own client library.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=True, capture_output=True, text=True).stdout


def _stubs(tree: Path) -> None:
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{include}", f"-Iinfer_proto={tree / 'proto'}", f"--python_out={tree / 'src'}",
            f"--grpc_python_out={tree / 'src'}", "infer_proto/infer.proto"]  # fmt: skip
    args += ["infer_proto/inference.proto"] if (tree / "proto" / "inference.proto").exists() else []
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed in {tree}")
    if list((tree / "src" / "infer_server").glob("*.c")):  # its C extension, built in place as `pip -e` does
        subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, check=True)


@contextmanager
def _checked_out(revision: str) -> Iterator[Path]:
    if revision == WORKTREE:
        yield REPO_ROOT
        return
    commit = _git("rev-parse", "--verify", f"{revision}^{{commit}}").strip()
    with tempfile.TemporaryDirectory(prefix="infer-ab-") as tmp:
        tree = Path(tmp) / commit[:12]
        _git("worktree", "add", "--detach", str(tree), commit)
        try:
            _stubs(tree)
            yield tree
        finally:
            _git("worktree", "remove", "--force", str(tree))


def _point(tree: Path, pipeline: str, transport: str, concurrency: int, extra: list[str]) -> dict[str, float]:
    if pipeline == "null":
        point = ["--null-model", "--null-concurrency", str(concurrency)]
    else:
        point = ["--no-null-model", "--concurrency", str(concurrency)]
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "benchmarks.fps", *point, "--transport", transport, "--json", out.name, *extra]
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
        env["PYTHONPATH"] = f"{tree / 'src'}{os.pathsep}{tree}"  # this revision's code, not the installed one
        done = subprocess.run(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"benchmarks.fps failed in {tree}:\n{done.stderr[-3000:]}")
        runs = json.loads(Path(out.name).read_text())["runs"]
    # The closed-loop point at this concurrency (a run with the models also measures paced points).
    (run,) = [r for r in runs if r["mode"] == "closed" and not r["round_index"] and r["concurrency"] == concurrency]
    bound = {"ratio_to_bound": run["ratio_to_bound"]} if run.get("ratio_to_bound") else {}  # with the models
    return {"fps": run["fps"], **bound, **{f"cpu_{k}": v for k, v in run["cpu_ms_per_image"].items()}}


def _oip_point(tree: Path, way: str, concurrency: int, extra: list[str]) -> dict[str, float]:
    """One round of ``benchmarks.oip`` (this tree's) against a server of ``tree``'s code."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "benchmarks.oip", "--ways", way, "--rounds", "1", "--clients", str(concurrency),
               "--json", out.name, *extra]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("INFER_")}
        env["PYTHONPATH"] = str(tree / "src")  # that revision's server (the benchmark adds this tree)
        done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"benchmarks.oip failed against {tree}:\n{done.stderr[-3000:]}")
        (row,) = json.loads(Path(out.name).read_text())["rounds"]
    return {"fps": row[way]["fps"], "cpu_server": row[way]["server_cpu_ms_per_image"],
            "cpu_clients": row[way]["clients_cpu_ms_per_image"]}  # fmt: skip


def main(
    a: Annotated[str, typer.Argument(help="Baseline revision (or WORKTREE).")],
    b: Annotated[str, typer.Argument(help="Revision compared with it (or WORKTREE).")],
    pipeline: Annotated[str, typer.Option(help="null (the data path alone) or full (the models too).")] = "null",
    transport: Annotated[str, typer.Option(help="tmpfs or inline.")] = "tmpfs",
    concurrency: Annotated[int, typer.Option(help="Client processes.")] = 4,
    rounds: Annotated[int, typer.Option(help="A, B pairs.")] = 5,
    a_args: Annotated[str, typer.Option(help="More benchmarks.fps options for A, e.g. '--tokens'.")] = "",
    b_args: Annotated[str, typer.Option(help="More benchmarks.fps options for B.")] = "",
    oip: Annotated[str, typer.Option(help="Measure this way in of benchmarks.oip (oip-shm, oip-inline, v1-inline, "
                                     "v1-tmpfs, v1-local, v1-local-inline) instead; --a-args/--b-args then go to "
                                     "benchmarks.oip.")] = "",
) -> None:
    """Alternate A and B on one point; print each round's B/A and the means."""
    if pipeline not in ("null", "full"):
        raise typer.BadParameter("--pipeline is null or full")
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    with _checked_out(a) as tree_a, _checked_out(b) as tree_b:
        for n in range(1, rounds + 1):
            # A then B in odd rounds, B then A in even ones: on this VM the second run of a pair is
            # measurably slower for long points (the full pipeline), which a fixed order charges to B.
            order = (("A", tree_a), ("B", tree_b)) if n % 2 else (("B", tree_b), ("A", tree_a))
            for label, tree in order:
                extra = (a_args if label == "A" else b_args).split()
                if oip:
                    results[label].append(_oip_point(tree, oip, concurrency, extra))
                else:
                    results[label].append(_point(tree, pipeline, transport, concurrency, extra))
            ra, rb = results["A"][-1], results["B"][-1]
            bounds = (f"  of the CPU-time bound: A {ra['ratio_to_bound']:.3f} B {rb['ratio_to_bound']:.3f}"
                      if "ratio_to_bound" in ra and "ratio_to_bound" in rb else "")  # fmt: skip
            print(f"round {n}: A {ra['fps']:7.0f}  B {rb['fps']:7.0f} img/s  B/A {rb['fps'] / ra['fps']:.2f}{bounds}")
    for label, revision in (("A", f"{a} {a_args}".strip()), ("B", f"{b} {b_args}".strip())):
        runs = results[label]
        cpu = {k: statistics.mean(r[k] for r in runs) for k in runs[0] if k.startswith("cpu_")}
        parts = ", ".join(f"{k[4:]} {v:.3f}" for k, v in cpu.items())
        print(f"{label} = {revision}: mean {statistics.mean(r['fps'] for r in runs):.0f} img/s; CPU ms/img {parts}")
    ratios = [rb["fps"] / ra["fps"] for ra, rb in zip(results["A"], results["B"], strict=True)]
    print(f"B/A: mean {statistics.mean(ratios):.3f}, rounds {' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    typer.run(main)
