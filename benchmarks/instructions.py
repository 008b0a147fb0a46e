"""The instructions the server's main process executes per push, counted by callgrind.

Time on this VM scatters by ±15% from one round to the next, more than most cuts to the front
win; ``benchmarks.hotpaths`` times pieces of the path warm, in one process, which misses what
the running server does between them. This counts the whole of it: the null-model server's main
process runs under ``valgrind --tool=callgrind`` (its workers natively), ``clients`` threads of
this process push ``pushes`` batches each once they are warm, and callgrind counts the machine
instructions the main process executed meanwhile: the push's admission, the handoff to a worker,
the answer, the reply, the event loop, the kernel's calls excepted. The same revision gives the
same count within about 1% run to run (the once-a-second housekeeping is the scatter), whatever
else the machine does, so two revisions compare by running this twice:

    .venv/bin/python -m benchmarks.instructions --clients 4 --images 8
    PYTHONPATH=<other tree>/src .venv/bin/python -m benchmarks.instructions   # another revision

(A revision with the C extension needs it built in its tree first: ``python setup.py build_ext
--inplace`` there.) Under callgrind the main process runs about fifty times slower, so the clients
always have their next push waiting: each wake-up of the loop finds more work than on a real box,
and the count per push is the work per push more than the loop's overhead per wake-up. It prints
the C functions that take most, by their own instructions and with what they call (what runs
the Python code is ``_PyEval_EvalFrameDefault``; callgrind does not see Python functions).
Needs valgrind (Debian's ``valgrind`` package).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Annotated

import typer

from benchmarks import oip, servers

_WARM_PUSHES = 20
_TRANSPORTS = {"local": "tmpfs", "local-inline": "inline", "tmpfs": "tmpfs", "inline": "inline"}


def _callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _total(profile: Path) -> int:
    """The instructions a callgrind profile counted (its ``totals:`` line; ``summary:`` is 0 in a
    dump made on request)."""
    counts = re.findall(r"^(?:summary|totals):\s*(\d+)", profile.read_text(errors="replace"), re.MULTILINE)
    if not counts:
        raise RuntimeError(f"no instruction total in {profile}")
    return max(int(n) for n in counts)


def _top(profile: Path, count: int, inclusive: bool) -> list[str]:
    """The ``count`` C functions with most instructions, as callgrind_annotate lists them: their
    own, or (``inclusive``) with what they call, leaving out the interpreter's and the event
    loop's plumbing (everything runs under those) and recursive entries."""
    out = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", str(profile)],
                         capture_output=True, text=True, check=True, timeout=300).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        match = re.match(r"^\s*[\d,]+ \(\s*([\d.]+)%\)\s+(\S+)", line)
        if match is None or "PROGRAM TOTALS" in line:
            continue
        if inclusive and (float(match.group(1)) > 50 or "'" in match.group(2) or "???" in match.group(2)):
            continue
        rows.append(re.sub(r"/tmp/python-build[^ ]*?/Python-[\d.]+/|\[[^]]*\]", "", line).rstrip()[:140])
    return rows[:count]


def main(
    clients: Annotated[int, typer.Option(help="Client threads pushing at once.")] = 4,
    images: Annotated[int, typer.Option(help="Images per push; also the server's --batch-size.")] = 8,
    pushes: Annotated[int, typer.Option(help="Pushes per client while counting.")] = 250,
    transport: Annotated[str, typer.Option(help="local (tmpfs on the local socket), local-inline, tmpfs or "
                                                "inline (gRPC).")] = "local",  # fmt: skip
    top: Annotated[int, typer.Option(help="C functions to list.")] = 25,
    server_arg: Annotated[
        list[str] | None,
        typer.Option(help="A server option, one word each: --server-arg=--event-loop --server-arg=asyncio."),
    ] = None,
) -> None:
    """Instructions of the main process per push and per image."""
    if transport not in _TRANSPORTS:
        raise typer.BadParameter(f"--transport: one of {', '.join(_TRANSPORTS)}")
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    from infer_client import InferClient

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p"]
        blobs = [Path(p).read_bytes() for p in servers.scene_files(Path(tmp))]
        batch = (blobs * (images // len(blobs) + 1))[:images]
        with oip.null_server(images, *(server_arg or ()), label="instructions", wrapper=wrapper) as server:
            assert server.shm_dir is not None and server.local_socket is not None
            local = str(server.local_socket) if transport.startswith("local") else None
            pool = [InferClient(server.address, shm_dir=str(server.shm_dir), transport=_TRANSPORTS[transport],  # type: ignore[arg-type]
                                local_socket=local) for _ in range(clients)]  # fmt: skip
            try:
                for client in pool:
                    for _ in range(_WARM_PUSHES):
                        client.detect(batch)
                pid = str(server.process.pid)
                _callgrind("--instr=on", pid)
                failures: list[BaseException] = []

                def push(client: InferClient) -> None:
                    try:
                        for _ in range(pushes):
                            client.detect(batch)
                    except BaseException as exc:  # a count over fewer pushes than it divides by is wrong
                        failures.append(exc)

                threads = [threading.Thread(target=push, args=(c,)) for c in pool]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                _callgrind("--instr=off", pid)
                _callgrind("--dump", pid)
                if failures:
                    raise failures[0]
            finally:
                for client in pool:
                    client.close()
            profile = max(Path(tmp).glob(f"callgrind.out.{pid}*"), key=lambda p: p.stat().st_mtime)
            total, count = _total(profile), clients * pushes
            per_push = total / count
            print(f"main process: {per_push:,.0f} instructions per push of {images} ({per_push / images:,.0f} "
                  f"per image), {count} pushes by {clients} clients, {transport}")  # fmt: skip
            for inclusive in (False, True):
                print(f"\n{'inclusive' if inclusive else 'own'} instructions, {count} pushes:")
                for row in _top(profile, top, inclusive):
                    print(row)


if __name__ == "__main__":
    typer.run(main)
