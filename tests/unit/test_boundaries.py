"""The tree is grouped by the process that runs the code; these rules keep it that way.

* ``front/`` (the server's asyncio process) never imports stage code; ``supervisor/`` (threads of
  the same process) neither, nor grpc: it spawns the workers by a function that imports the stage
  in the child only.
* ``stage/`` (the worker processes) never imports grpc, the front or the supervisor: it knows only
  ``messages``.
* ``messages`` is the standard library only (it is unpickled in every process).
* ``relay/`` (the gRPC front processes) never imports the stage, the supervisor or the front's
  state: of the front, only ``listen`` (where gRPC listens, and its limits).
* The client library never imports the server.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
STDLIB = set(sys.stdlib_module_names)


def module_imports(path: Path) -> set[str]:
    """Modules imported at module level (``if TYPE_CHECKING:`` blocks included), absolute names."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    body = list(tree.body)
    while body:
        node = body.pop(0)
        if isinstance(node, ast.If | ast.Try):
            body += node.body + node.orelse + getattr(node, "finalbody", []) + getattr(node, "handlers", [])
        elif isinstance(node, ast.ExceptHandler):
            body += node.body
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def files(package: str) -> list[Path]:
    found = sorted((SRC / package.replace(".", "/")).rglob("*.py"))
    assert found, package
    return found


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in files(package):
        hits = sorted(m for m in module_imports(path) if m.split(".")[0] in forbidden or m.startswith(forbidden))
        if hits:
            bad[str(path.relative_to(SRC))] = hits
    return bad


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("infer_server/front", ("infer_server.stage",)),
        ("infer_server/supervisor", ("infer_server.stage", "infer_server.front", "grpc", "infer_proto")),
        ("infer_server/stage", ("grpc", "grpc_health", "infer_proto", "infer_server.front", "infer_server.supervisor",
                                "infer_server.settings", "infer_server.cli")),
        ("infer_client", ("infer_server",)),
    ],
)  # fmt: skip
def test_no_package_imports_across_its_process_boundary(package: str, forbidden: tuple[str, ...]) -> None:
    assert offending(package, forbidden) == {}


def test_a_front_process_imports_only_where_to_listen_of_the_main_process() -> None:
    forbidden = ("infer_server.stage", "infer_server.supervisor", "infer_server.front", "infer_server.messages")
    bad = offending("infer_server/relay", forbidden)
    assert {path: [m for m in hits if m != "infer_server.front.listen"] for path, hits in bad.items()} == {
        path: [] for path in bad
    }


def test_messages_need_only_the_standard_library() -> None:
    """What crosses the pipes, and ``records`` that makes it, unpickle in any process: nothing
    beyond the standard library and this package's own C extension ``_records``."""
    for module, allowed in (("messages.py", {"infer_server.records"}), ("records.py", {"infer_server._records"})):
        imports = module_imports(SRC / "infer_server" / module)
        assert {m for m in imports if m.split(".")[0] not in STDLIB | {"__future__"}} == allowed


def test_every_package_is_shipped() -> None:
    """The wheel (what the images install) holds every package: pyproject lists them one by one."""
    listed = set(re.search(r"^packages = \[(.*)\]$", (SRC.parent / "pyproject.toml").read_text(), re.M)[1]  # type: ignore[index]
                 .replace('"', "").replace(" ", "").split(","))  # fmt: skip
    packages = {str(p.parent.relative_to(SRC)).replace("/", ".") for p in SRC.rglob("__init__.py")}
    assert packages - listed == set()
