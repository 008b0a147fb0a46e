"""Render (and lint) the chart offline, without a helm binary: ``helm template`` for machines that have none.

    .venv-image/bin/python deploy/helm/render.py [-f VALUES.yaml ...] [--set key=value ...] > manifests.yaml

Runs in the image tests' virtualenv (``helm-python-sdk``, Helm v4 as a library; ``make image-test``
makes it). Values files are merged in order over the chart's own, as ``helm -f`` does; the chart is
linted strictly with the same values first, and the run fails on any finding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parent / "infer-server"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-f", "--values", action="append", default=[], type=Path, help="values file (repeatable)")
    p.add_argument("--set", action="append", default=[], help="key=value (repeatable)")
    p.add_argument("--name", default="infer", help="release name")
    args = p.parse_args()
    values: dict[str, Any] = {}
    for path in args.values:
        values = _merge(values, yaml.safe_load(path.read_text()) or {})
    for assignment in args.set:
        values = _merge(values, helm.parse_set_string(assignment))
    report = helm.lint(str(CHART), values, strict=True)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
    if problems:
        print(f"helm lint: {problems}", file=sys.stderr)
        return 1
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name=args.name, namespace="default", is_install=True)
    for path in sorted(rendered):
        text = rendered[path].strip()
        if (
            text
            and not path.endswith("NOTES.txt")
            and any(line and not line.startswith("#") for line in text.splitlines())
        ):
            print(f"---\n# Source: {path}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
