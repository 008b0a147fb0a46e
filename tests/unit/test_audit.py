"""The audit line of a push: its transport and its size, whatever the push held."""

from __future__ import annotations

import json
import logging

import pytest

from infer_proto import infer_pb2
from infer_server.front import audit

_CASES = {
    "admitted inline, many images": ("accepted", dict(data=b"x" * 5000, sizes=[1] * 5000), "inline", 5000),
    "admitted tmpfs": ("retry", dict(path="a.bin", sizes=[3, 4]), "tmpfs", 7),
    "refused inline, sizes wrong": ("refused", dict(data=b"abc", sizes=[5]), "inline", 3),
    "refused, both path and data": ("refused", dict(path="a.bin", data=b"ab", sizes=[2]), "inline", 2),
    "refused tmpfs, millions of sizes": ("refused", dict(path="a.bin", sizes=[1] * 5000), "tmpfs", None),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_a_push_is_audited_with_its_transport_and_size(case: str, caplog: pytest.LogCaptureFixture) -> None:
    verdict, fields, transport, size = _CASES[case]
    with caplog.at_level(logging.INFO, logger="infer_server.audit"):
        audit.push("local:pid=1,uid=2", "anonymous", infer_pb2.PushDataRequest(**fields), verdict)
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "infer_server.audit"]
    assert (line["transport"], line["bytes"], line["images"]) == (transport, size, len(fields["sizes"]))
