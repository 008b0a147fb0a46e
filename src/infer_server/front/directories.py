"""The directories of the handoff: whether the server may trust them, what file system they are
on. Used by ``front.handoff`` in the server's main process."""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

log = logging.getLogger(__name__)

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_dir(path: str, what: str) -> int:
    try:
        return os.open(path, DIR_FLAGS)
    except OSError as exc:
        raise RuntimeError(f"{what} {path} cannot be opened as a directory: {exc.strerror}") from None


def check_shared_root(st: os.stat_result, path: str) -> None:
    """Refuse a shared directory another user could use to redirect the server's files."""
    euid = os.geteuid()
    if st.st_uid != euid:
        raise RuntimeError(
            f"shared directory {path} belongs to uid {st.st_uid}, not to this server's user (uid {euid}): whoever "
            f"owns it can swap what is inside. Remove it (the server then creates it, 0700), or create it as the "
            f"server's user: mkdir -m 0700 {path}"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise RuntimeError(
            f"shared directory {path} is writable by group or others without the sticky bit: any of them could "
            f"rename or replace what is inside. Run chmod +t {path} (or chmod go-w {path})"
        )


def filesystem_type(path: str, mounts: str = "/proc/self/mounts") -> str:
    """The type of the file system ``path`` (a real path) lives on: its longest mount point prefix."""
    best, kind = "", ""
    try:
        lines = Path(mounts).read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        # Mount points escape blanks and backslashes as octal (\040); undo that.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind
