"""The tmpfs handoff refuses everything docs/architecture.md's "Security of the handoff" lists, on real files."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from infer_server.front.directories import filesystem_type
from infer_server.front.errors import InvalidBatch, PermissionDeniedError
from infer_server.front.handoff import BatchFile, Handoff, HandoffLimits
from infer_server.front.staging import TAG

LIMITS = HandoffLimits(max_images=8, max_bytes=1000, max_name_bytes=16, max_path_bytes=200)


@pytest.fixture
def shm() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="infer-handoff-", dir="/dev/shm"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def root(shm: Path) -> Path:
    return shm / "root"


@pytest.fixture
def handoff(root: Path) -> Handoff:
    h = Handoff(root, root / ".server", LIMITS)
    h.prepare_dirs()
    return h


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


def push(handoff: Handoff, path: str, sizes: list[int], names: list[str] | None = None) -> BatchFile:
    return handoff.materialize(handoff.plan(path, b"", sizes, names or []))


def refused(exc_type: type[Exception], fn, *args) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(exc_type) as info:
        fn(*args)
    message = str(info.value)
    assert "/dev/shm" not in message and "/" not in message.replace("group/world", "")
    return message


def test_valid_file_gives_descriptor_with_offsets(handoff: Handoff, root: Path) -> None:
    f = write(root / "client" / "b1.bin", b"a" * 10 + b"b" * 20 + b"c" * 5)
    batch = push(handoff, str(f), [10, 20, 5], ["x.jpg", "y.jpg", "z.jpg"])
    st = os.stat(f)
    assert (batch.path, batch.file.dev, batch.file.ino, batch.file.size, batch.staged) == (
        str(f),
        st.st_dev,
        st.st_ino,
        35,
        False,
    )
    assert [(r.index, r.offset, r.size, r.name) for r in batch.images] == [
        (0, 0, 10, "x.jpg"),
        (1, 10, 20, "y.jpg"),
        (2, 30, 5, "z.jpg"),
    ]


def test_relative_path_resolves_beneath_root(handoff: Handoff, root: Path) -> None:
    f = write(root / "b.bin", b"12345")
    assert push(handoff, "b.bin", [5]).path == str(f)


@pytest.mark.parametrize("path", ["../outside.bin", "client/../../outside.bin", "client/../b.bin"])
def test_dot_dot_is_refused(handoff: Handoff, root: Path, shm: Path, path: str) -> None:
    write(shm / "outside.bin", b"12345")
    write(root / "b.bin", b"12345")
    assert refused(PermissionDeniedError, push, handoff, path, [5]) == "path is outside the shared directory"


def test_absolute_path_elsewhere_is_refused(handoff: Handoff, shm: Path, root: Path) -> None:
    outside = write(shm / "outside.bin", b"12345")
    assert "outside" in refused(PermissionDeniedError, push, handoff, str(outside), [5])
    assert "outside" in refused(PermissionDeniedError, push, handoff, str(root), [5])
    assert "outside" in refused(PermissionDeniedError, push, handoff, "/etc/passwd", [5])


def test_staging_directory_is_off_limits(handoff: Handoff, root: Path) -> None:
    staged = handoff.stage_inline(b"12345", handoff.plan("", b"12345", [5], []).images)
    message = refused(PermissionDeniedError, push, handoff, staged.path, [5])
    assert message == "path points into the server's own directory"
    refused(PermissionDeniedError, push, handoff, ".server/" + os.path.basename(staged.path), [5])


def test_final_symlink_is_refused_inside_and_out(handoff: Handoff, root: Path, shm: Path) -> None:
    target = write(root / "real.bin", b"12345")
    (root / "inside-link.bin").symlink_to(target)
    assert "symbolic" in refused(PermissionDeniedError, push, handoff, str(root / "inside-link.bin"), [5])
    (root / "outside-link.bin").symlink_to(write(shm / "secret.bin", b"12345"))
    assert "outside" in refused(PermissionDeniedError, push, handoff, str(root / "outside-link.bin"), [5])


def test_intermediate_symlink_is_refused_inside_and_out(handoff: Handoff, root: Path, shm: Path) -> None:
    write(root / "real" / "b.bin", b"12345")
    (root / "alias").symlink_to(root / "real")
    assert "symbolic" in refused(PermissionDeniedError, push, handoff, str(root / "alias" / "b.bin"), [5])
    write(shm / "elsewhere" / "b.bin", b"12345")
    (root / "escape").symlink_to(shm / "elsewhere")
    assert "outside" in refused(PermissionDeniedError, push, handoff, "escape/b.bin", [5])


def test_another_shards_staging_directory_is_off_limits_too(root: Path) -> None:
    """With --shards, each shard stages into a directory of its own: a client must not push
    another shard's staged (other callers') bytes through this one."""
    shards = [Handoff(root, root / ".server", LIMITS, others=[root / ".server.shard-1"]),
              Handoff(root, root / ".server.shard-1", LIMITS, others=[root / ".server"])]  # fmt: skip
    for handoff in shards:
        handoff.prepare_dirs()
    for handoff, other in ((shards[0], shards[1]), (shards[1], shards[0])):
        staged = other.stage_inline(b"12345", other.plan("", b"12345", [5], []).images)
        assert refused(PermissionDeniedError, push, handoff, staged.path, [5]) == _OWN_DIRECTORY
        relative = os.path.relpath(staged.path, root)
        assert refused(PermissionDeniedError, push, handoff, relative, [5]) == _OWN_DIRECTORY
        (root / f"to-{id(other)}").symlink_to(Path(staged.path).parent)
        via_link = f"to-{id(other)}/{os.path.basename(staged.path)}"
        assert refused(PermissionDeniedError, push, handoff, via_link, [5]) == _OWN_DIRECTORY


_OWN_DIRECTORY = "path points into the server's own directory"


def test_a_symlink_into_staging_is_refused_with_that_reason(handoff: Handoff, root: Path) -> None:
    staged = handoff.stage_inline(b"12345", handoff.plan("", b"12345", [5], []).images)
    (root / "to-staging").symlink_to(root / ".server")
    path = "to-staging/" + os.path.basename(staged.path)
    assert refused(PermissionDeniedError, push, handoff, path, [5]) == "path points into the server's own directory"


def test_any_spelling_of_a_path_beneath_the_root_is_read_from_the_root(handoff: Handoff, root: Path, shm: Path) -> None:
    f = write(root / "client" / "b.bin", b"12345")
    for path in ("./client//b.bin", str(root) + "//client/./b.bin", "client/b.bin/"):
        assert push(handoff, path, [5]).path == str(f)
    (shm / "alias").symlink_to(root)  # a root configured through a symlinked name: both names work
    handoff.remove_staging_dir()  # one server per staging directory
    aliased = Handoff(shm / "alias", root / ".server", LIMITS)
    aliased.prepare_dirs()
    assert push(aliased, str(shm / "alias" / "client" / "b.bin"), [5]).path == str(f)
    assert push(aliased, str(f), [5]).path == str(f)
    assert "outside" in refused(PermissionDeniedError, push, aliased, str(shm / "alias"), [5])


@pytest.mark.parametrize("staging", [".", ".."])
def test_a_staging_directory_that_is_or_holds_the_root_is_refused(root: Path, staging: str) -> None:
    """Its files are deleted at start and stop: the clients' files must never be among them."""
    client = write(root / "client.bin", b"12345")
    with pytest.raises(RuntimeError, match="must not be the shared directory or contain it"):
        Handoff(root, root / staging, LIMITS).prepare_dirs()
    assert client.read_bytes() == b"12345"


def test_hard_link_is_refused(handoff: Handoff, root: Path, shm: Path) -> None:
    outside = write(shm / "secret.bin", b"12345")
    os.link(outside, root / "linked.bin")
    assert "hard link" in refused(PermissionDeniedError, push, handoff, str(root / "linked.bin"), [5])


@pytest.mark.timeout(10)
def test_fifo_is_refused_without_blocking(handoff: Handoff, root: Path) -> None:
    os.mkfifo(root / "pipe", 0o600)
    assert refused(InvalidBatch, push, handoff, str(root / "pipe"), [5]) == "path is not a regular file"


def test_directory_is_refused(handoff: Handoff, root: Path) -> None:
    (root / "dir").mkdir()
    assert refused(InvalidBatch, push, handoff, str(root / "dir"), [5]) == "path is not a regular file"
    write(root / "file.bin", b"12345")
    assert "no file at this path" in refused(PermissionDeniedError, push, handoff, str(root / "file.bin" / "x"), [5])


def test_missing_file(handoff: Handoff, root: Path) -> None:
    assert "no file at this path" in refused(PermissionDeniedError, push, handoff, str(root / "nope.bin"), [5])


def test_a_socket_is_refused_like_a_missing_file(handoff: Handoff, root: Path) -> None:
    import socket

    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(root / "sock"))
        missing = refused(PermissionDeniedError, push, handoff, str(root / "nope.bin"), [5])
        assert refused(PermissionDeniedError, push, handoff, str(root / "sock"), [5]) == missing


def test_another_users_file_is_refused_like_a_missing_one(handoff: Handoff, root: Path) -> None:
    """Neither its existence nor its size shows: the same code and words as for no file at all."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    theirs = write(root / "theirs.bin", b"x" * 999)
    os.chown(theirs, 4321, 4321)
    missing = refused(PermissionDeniedError, push, handoff, str(root / "nope.bin"), [5])
    assert refused(PermissionDeniedError, push, handoff, str(theirs), [5]) == missing
    assert refused(PermissionDeniedError, push, handoff, str(theirs), [999]) == missing
    plan = handoff.plan(str(theirs), b"", [999], [])
    batch = handoff.materialize(plan, owners={os.geteuid(), 4321})  # a caller allowed that user's files
    handoff.release(batch)
    os.mkfifo(root / "their-pipe", 0o600)
    os.chown(root / "their-pipe", 4321, 4321)
    assert refused(PermissionDeniedError, push, handoff, str(root / "their-pipe"), [5]) == missing


def test_size_mismatch_reports_both_sizes(handoff: Handoff, root: Path) -> None:
    f = write(root / "b.bin", b"x" * 999)
    message = refused(InvalidBatch, push, handoff, str(f), [500, 500])
    assert message == "sizes add up to 1000 bytes but the file holds 999"


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_group_or_world_writable_is_refused(handoff: Handoff, root: Path, mode: int) -> None:
    f = write(root / "b.bin", b"12345", mode)
    assert "writable" in refused(PermissionDeniedError, push, handoff, str(f), [5])


def test_read_only_for_others_is_fine(handoff: Handoff, root: Path) -> None:
    f = write(root / "b.bin", b"12345", 0o644)
    assert push(handoff, str(f), [5]).file.size == 5


def test_layout_limits(handoff: Handoff) -> None:
    plan = handoff.plan
    assert refused(InvalidBatch, plan, "b.bin", b"", [1] * 9, []) == "a batch holds at most 8 images, got 9"
    assert refused(InvalidBatch, plan, "b.bin", b"", [600, 401], []) == "a batch holds at most 1000 bytes"
    assert refused(InvalidBatch, plan, "b.bin", b"", [5, 0, 5], []) == "image 1 has size 0"
    assert refused(InvalidBatch, plan, "b.bin", b"", [], []) == "a batch needs at least one image size"
    assert refused(InvalidBatch, plan, "b.bin", b"xxxxx", [5], []) == "send either 'path' or 'data', not both"
    assert refused(InvalidBatch, plan, "", b"", [5], []) == "a batch needs either 'path' or 'data'"
    assert refused(InvalidBatch, plan, "b.bin", b"", [2, 3], ["a"]) == "got 1 names for 2 images"
    assert "longer" in refused(InvalidBatch, plan, "b.bin", b"", [5], ["n" * 17])


def test_sizes_near_uint64_max_do_not_overflow(handoff: Handoff) -> None:
    sizes = [2**64 - 1, 2**64 - 1, 2]  # would wrap to 0 in 64-bit arithmetic
    assert refused(InvalidBatch, handoff.plan, "b.bin", b"", sizes, []) == "a batch holds at most 1000 bytes"


def test_nul_byte_in_path(handoff: Handoff) -> None:
    assert refused(InvalidBatch, push, handoff, "b\x00.bin", [5]) == "path contains a NUL byte"


def test_inline_data_is_staged_owner_only_and_released(handoff: Handoff, root: Path) -> None:
    data = b"abc" + b"defgh"
    batch = handoff.materialize(handoff.plan("", data, [3, 5], []))
    assert batch.staged and Path(batch.path).parent == root / ".server"
    st = os.stat(batch.path)
    size = TAG + 8  # the staging's tag, then the data
    assert st.st_mode & 0o777 == 0o600 and (st.st_dev, st.st_ino, st.st_size) == (batch.file.dev, batch.file.ino, size)
    assert Path(batch.path).read_bytes() == batch.file.tag + data and len(batch.file.tag) == TAG
    assert [(r.offset, r.size) for r in batch.images] == [(TAG, 3), (TAG + 3, 5)]
    assert not [p for p in os.listdir(root / ".server") if p.endswith(".tmp")]
    handoff.release(batch)
    again = handoff.materialize(handoff.plan("", b"ij", [2], []))
    assert again.path == batch.path and Path(again.path).read_bytes() == again.file.tag + b"ij", "kept, rewritten"
    assert again.file.tag != batch.file.tag
    handoff.release(again)
    handoff.remove_staging_dir()
    assert not (root / ".server").exists()


def test_inline_size_mismatch(handoff: Handoff) -> None:
    message = refused(InvalidBatch, handoff.plan, "", b"x" * 7, [3, 5], [])
    assert message == "sizes add up to 8 bytes but data holds 7"


def test_release_never_touches_client_files(handoff: Handoff, root: Path) -> None:
    f = write(root / "b.bin", b"12345")
    handoff.release(push(handoff, str(f), [5]))
    assert f.exists()


def test_janitor_sweeps_only_old_unused_files(handoff: Handoff, root: Path) -> None:
    images = handoff.plan("", b"12345", [5], []).images
    old, in_use, fresh = (handoff.stage_inline(b"12345", images) for _ in range(3))
    past = time.time() - 3600
    for batch in (old, in_use):
        os.utime(batch.path, (past, past))
    assert handoff.sweep(600.0, keep={in_use.path}) == 1
    assert sorted(os.listdir(root / ".server")) == sorted(os.path.basename(b.path) for b in (in_use, fresh))
    handoff.remove_staging_dir()
    assert not (root / ".server").exists()


def test_staging_directory_must_be_private(root: Path, shm: Path) -> None:
    root.mkdir()
    (shm / "elsewhere").mkdir()
    (root / ".server").symlink_to(shm / "elsewhere")
    with pytest.raises(RuntimeError):
        Handoff(root, root / ".server", LIMITS).prepare_dirs()


def test_a_shared_directory_on_tmpfs_is_validated_on_the_loop(handoff: Handoff) -> None:
    assert handoff.in_memory  # these tests' root lives under /dev/shm


def test_file_system_type_comes_from_the_longest_mount_point(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "tmpfs /dev/shm tmpfs rw,nosuid 0 0\n"
        "tmpfs /run/my\\040apps ramfs rw 0 0\n"
        "nfs:/x /dev/shm/net nfs rw 0 0\n"
    )
    kinds = {
        p: filesystem_type(p, str(mounts)) for p in ("/dev/shm/infer", "/dev/shm/net/a", "/dev/shmx", "/run/my apps/b")
    }
    assert kinds == {"/dev/shm/infer": "tmpfs", "/dev/shm/net/a": "nfs", "/dev/shmx": "ext4", "/run/my apps/b": "ramfs"}
    assert filesystem_type("/x", str(tmp_path / "missing")) == ""


def test_one_server_per_staging_directory_and_leftovers_are_cleared(root: Path) -> None:
    """Finding: staged files of a SIGKILLed server survived until a later one had run 15 minutes;
    clearing them at start is only safe if no other live server uses the directory."""
    first = Handoff(root, root / ".server", LIMITS)
    first.prepare_dirs()
    with pytest.raises(RuntimeError, match="another server is using the staging directory"):
        Handoff(root, root / ".server", LIMITS).prepare_dirs()
    first.stage_inline(b"12345", ())  # what a killed server leaves: its staging copy, its lock gone
    os.close(first.tiers[0].fd)
    later = Handoff(root, root / ".server", LIMITS)
    later.prepare_dirs()
    assert os.listdir(root / ".server") == []
    later.remove_staging_dir()


def test_staging_sweeps_and_removes_only_the_servers_own_files(shm: Path) -> None:
    """A spill directory is a path an operator chose: what else is in it is not the server's."""
    from infer_server.front.staging import StagingDir

    spill = shm / "spill"
    spill.mkdir(mode=0o700)
    (spill / "notes.txt").write_text("keep me")
    (spill / f"{'a' * 32}.batch").write_bytes(b"a staged copy a killed server left")
    tier = StagingDir(spill, "spill directory")
    tier.open(str(shm / "root"))
    assert sorted(p.name for p in spill.iterdir()) == ["notes.txt"]
    _, fd, _, _ = tier.stage(b"12345")
    os.close(fd)
    tier.remove()
    assert sorted(p.name for p in spill.iterdir()) == ["notes.txt"], "the directory stays: it is not empty"


def test_an_output_into_a_leased_region_is_refused_at_once(handoff: Handoff, root: Path) -> None:
    """A caller's read lease on its region file makes a plain open for writing wait for the lease
    to break (45 s by default) — on the event loop, where small outputs are written. The write
    opens without waiting and answers UNAVAILABLE instead."""
    from infer_proto import inference_pb2
    from infer_server.front.errors import Unavailable
    from infer_server.front.identity import Identity
    from infer_server.front.regions import Regions

    write(root / "region", b"\0" * 4096)
    uid = os.geteuid()
    regions, caller = Regions(handoff, frozenset({uid})), Identity("caller", frozenset({uid}))
    regions.register(caller, "r", "/region", 0, 4096)
    parameters = inference_pb2.ModelInferRequest.InferRequestedOutputTensor().parameters
    parameters["shared_memory_region"].string_param = "r"
    parameters["shared_memory_byte_size"].int64_param = 64
    held = os.open(root / "region", os.O_RDONLY)
    previous = signal.signal(signal.SIGIO, signal.SIG_IGN)  # the lease holder is told of the attempt
    try:
        fcntl.fcntl(held, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        started = time.monotonic()
        with pytest.raises(Unavailable, match="leased"):
            regions.write(caller, parameters, b"x" * 16)
        assert time.monotonic() - started < 5
    finally:
        os.close(held)
        signal.signal(signal.SIGIO, previous)
        regions.close()


def test_refused_paths_leave_the_held_root_open(handoff: Handoff, root: Path) -> None:
    """Client files are opened beneath the shared directory's descriptor, held from start-up: no
    refusal (the root itself, a directory, a missing file, a path through a file) may close it."""
    (root / "dir").mkdir()
    write(root / "file.bin", b"12345")
    open_before = len(os.listdir("/proc/self/fd"))
    for path in (str(root), f"{root}/", str(root / "dir"), str(root / "missing.bin"), str(root / "file.bin" / "x")):
        with pytest.raises((InvalidBatch, PermissionDeniedError)):
            push(handoff, path, [5])
    assert len(os.listdir("/proc/self/fd")) == open_before
    batch = push(handoff, str(root / "file.bin"), [5])
    assert os.pread(batch.file.fd, 5, 0) == b"12345"
    handoff.release(batch)
