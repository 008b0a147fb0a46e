"""The client library on a tmpfs that fills up: a clear error, never SIGBUS (needs a mount namespace)."""

from __future__ import annotations

import errno
from pathlib import Path

from tests.helpers import on_small_tmpfs

_FULL_TMPFS = """
import os, sys
from infer_client._protocol import BatchFiles
files = BatchFiles(sys.argv[1])
path, _ = files.write([b"a" * 300_000])
files.recycle(path)
with open(os.path.join(sys.argv[1], "filler"), "wb") as f:  # fill the file system
    try:
        while True:
            f.write(b"f" * 65536)
            f.flush()
    except OSError:
        pass
try:
    files.write([b"b" * 1_500_000])  # more pages than are left: must fail, not fault
except OSError as exc:
    print("refused", exc.errno)
"""


def test_a_full_file_system_is_an_error_not_a_crash(tmp_path: Path) -> None:
    """A copy into a mapped file faults its pages in; on a full tmpfs that would be SIGBUS."""
    proc = on_small_tmpfs(tmp_path, _FULL_TMPFS)
    assert proc.returncode == 0, proc.returncode  # SIGBUS: -7 / 135
    assert proc.stdout.split() == ["refused", str(errno.ENOSPC)]
