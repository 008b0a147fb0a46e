"""The lock files every install uses, and the check that they still satisfy ``pyproject.toml``.

``pyproject.toml`` keeps ranges, for people who install the library into their own environment.
Everything this repository installs itself — ``make``, ``.ci/run``, the container images — takes
exact versions with hashes from one of the files beside this script, so a fresh machine gets what
the tests last passed with:

==============  ======================================================================
``server.txt``  the server and client at run time (what a deployment image installs)
``build.txt``   the build requirements alone (a deployment image builds the project's wheel with them)
``image.txt``   the image tests' tools alone: validators for Dockerfiles, compose, the chart (``make image-test``)
``triton.txt``  Triton's client alone (``.venv-triton``): the Open Inference Protocol tests' client
``perf.txt``    Triton's load tool alone (``.venv-perf``): ``perf_analyzer`` against the server
``peers.txt``   Triton's server alone (``.venv-peers``, nvidia-pytriton's ``tritonserver``): the benchmark's peer
``dev.txt``     server + tests + lint + the build requirements (``make test``, CI)
``bench.txt``   dev + the fps benchmark's plotting (``make bench``)
``train.txt``   dev + the recipe's torch, the CPU build (``make models``)
==============  ======================================================================

``python requirements/lock.py compile`` (``make lock``) resolves them again with uv, Linux x86-64,
Python 3.11, newest versions within the ranges (``compile --keep``, ``make lock-keep``: every pin
that still fits stays, so adding a dependency moves nothing else); pip's configured ``--find-links`` directories are
passed on, which is where the CPU build of torch (``torch==2.13.0+cpu``, pinned by hash in
``train.txt``) comes from: the registry serves only the CUDA build. Elsewhere ``make models`` needs
that wheel from PyTorch's CPU wheel index (``PIP_EXTRA_INDEX_URL``) or a local directory.
``python requirements/lock.py check`` (run by ``.ci/run``) fails when a lock no longer satisfies
what ``pyproject.toml`` asks of its set: a requirement missing, a pinned version outside its
range, or a pin without a hash.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
PYPROJECT = HERE.parent / "pyproject.toml"
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
# Sets that need a newer glibc than PLATFORM's (a benchmark's tool, never the server): nvidia-pytriton's
# wheel is manylinux_2_35 (Debian 12 has glibc 2.36).
PLATFORMS = {"peers": "x86_64-manylinux_2_35"}
# set name -> extras of the project it installs, whether it adds [build-system].requires, and whether
# the project's own dependencies are in it (not for a set of tools that only works beside it).
SETS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "server": ((), False, True),
    "build": ((), True, False),
    "image": (("image",), False, False),
    "triton": (("triton",), False, False),
    "perf": (("perf",), False, False),
    "peers": (("peers",), False, False),
    "dev": (("dev",), True, True),
    "bench": (("dev", "bench"), True, True),
    "train": (("dev", "train"), True, True),
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def requirements_of(name: str) -> list[Requirement]:
    """What ``pyproject.toml`` asks of set ``name``: dependencies, its extras, build requirements."""
    project = _project()
    extras, with_build, with_project = SETS[name]
    reqs = [Requirement(r) for r in project["project"]["dependencies"]] if with_project else []
    for extra in extras:
        reqs += [Requirement(r) for r in project["project"]["optional-dependencies"][extra]]
    if with_build:
        reqs += [Requirement(r) for r in project["build-system"]["requires"]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def read_lock(path: Path) -> dict[str, tuple[str, bool]]:
    """``{canonical name: (version, has a hash)}`` from a hashed requirements file."""
    pins: dict[str, tuple[str, bool]] = {}
    current = None
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (m.group(2), False)
        elif current and line.strip().startswith("--hash=sha256:"):
            pins[current] = (pins[current][0], True)
    return pins


def check(name: str) -> list[str]:
    """Problems of ``<name>.txt`` against ``pyproject.toml``; [] when it satisfies it."""
    path = HERE / f"{name}.txt"
    if not path.exists():
        return [f"{path.name}: missing (run `make lock`)"]
    pins = read_lock(path)
    problems = [f"{path.name}: {pkg}=={ver} has no hash" for pkg, (ver, hashed) in pins.items() if not hashed]
    for req in requirements_of(name):
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{path.name}: {req} is not locked")
        elif not req.specifier.contains(Version(pin[0]), prereleases=True):
            problems.append(f"{path.name}: {req.name}=={pin[0]} does not satisfy {req}")
    return problems


def _find_links() -> list[str]:
    """pip's --find-links directories (environment or config), so uv sees the same local wheels."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    if not links:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                             capture_output=True, text=True, check=False)
        links = out.stdout.split() if out.returncode == 0 else []
    return [link for link in links if link]


def compile_set(name: str, uv: str, keep: bool = False) -> None:
    extras, with_build, with_project = SETS[name]
    out = HERE / f"{name}.txt"
    with tempfile.TemporaryDirectory() as tmp:
        build_in = Path(tmp) / "build-system.in"
        build_in.write_text("\n".join(_project()["build-system"]["requires"]) + "\n")
        tools_in = Path(tmp) / "tools.in"  # a set without the project: its requirements, listed
        tools_in.write_text("".join(f"{r}\n" for r in requirements_of(name)))
        if with_project:
            cmd = [uv, "pip", "compile", "pyproject.toml", *(arg for extra in extras for arg in ("--extra", extra))]
            cmd += [str(build_in)] if with_build else []
        else:
            cmd = [uv, "pip", "compile", str(tools_in)]
        platform = PLATFORMS.get(name, PLATFORM)
        # --keep: uv prefers the versions already in the output file, moving only what must move.
        cmd += [] if keep else ["--upgrade"]
        cmd += ["--generate-hashes", "--python-version", PYTHON_VERSION, "--python-platform", platform,
                "--no-header", "--quiet", "-o", str(out)]
        cmd += [arg for link in _find_links() for arg in ("--find-links", link)]
        print("+", shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=PYPROJECT.parent)
    if not with_project:
        what = "build-system requires only" if with_build and not extras else f"extras {', '.join(extras)} only"
    else:
        what = f"extras: {', '.join(extras) or 'none'}{'; + build-system requires' if with_build else ''}"
    header = (f"# Locked set '{name}' ({what}), Python {PYTHON_VERSION}, {platform}.\n"
              "# Generated by `make lock` (requirements/lock.py); never edit by hand.\n")
    # The temporary input's path would differ run to run: name it by what it is.
    text = out.read_text().replace(str(build_in), "build-system.requires").replace(str(tools_in), f"{name} set")
    out.write_text(header + text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("compile", "check"))
    p.add_argument("--uv", default=str(Path(sys.executable).with_name("uv")), help="the uv binary to resolve with")
    p.add_argument("--keep", action="store_true",
                   help="compile: keep every pin that still fits (add or move only what pyproject.toml now needs)")
    p.add_argument("sets", nargs="*", default=list(SETS), help=f"which sets (default: all of {', '.join(SETS)})")
    args = p.parse_args()
    if args.action == "compile":
        for name in args.sets:
            compile_set(name, args.uv, args.keep)
    problems = [msg for name in args.sets for msg in check(name)]
    for msg in problems:
        print(msg, file=sys.stderr)
    if not problems:
        print(f"lock files satisfy pyproject.toml: {', '.join(args.sets)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
