"""The product's code stays readable in one sitting: no module over 400 lines, no function over 50.

Complexity is ruff's job (C901, max 10, in ``make lint``); lengths are checked here. Generated gRPC
stubs are not ours and not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50


def sources() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py")) if not p.name.endswith(("_pb2.py", "_pb2_grpc.py"))]


def test_no_module_is_longer_than_the_bound() -> None:
    long = {str(p.relative_to(SRC)): n for p in sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}


def test_no_function_is_longer_than_the_bound() -> None:
    long = {}
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(SRC)}:{node.lineno} {node.name}"] = lines
    assert long == {}
