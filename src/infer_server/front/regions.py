"""System shared memory, the Open Inference Protocol's version of the tmpfs handoff, confined the
way PushData's paths are (and Triton's own implementation was not: CVE-2024-0088,
CVE-2025-23319/23320/23334 — offsets and sizes not checked, keys reaching anywhere).

In the server's main process. A region is registered by its caller under a name: ``key`` names a
file relative to the server's shared directory (``/input0`` is ``<shared dir>/input0``; Triton's
clients create their regions with ``shm_open``, i.e. in ``/dev/shm``: serve them with ``--shm-dir
/dev/shm``). The file is opened the way ``Handoff`` opens a pushed file — one component at a time
from the directory's descriptor, no symlink, no ``..``, a regular file with one link on the shared
file system, not writable by group or others, owned by a uid this caller may push files of — and
held open; ``offset + byte_size`` must lie within it (Python integers: no wrap-around). Regions are
each caller's own (another caller's name is unknown to it), at most ``MAX_REGIONS`` each.

Using one (``shared_memory_region``, ``shared_memory_offset``, ``shared_memory_byte_size`` on the
input): the range is checked against the region, the file is checked to still be the one that was
registered (replaced: the region is dropped and the request refused), and the region's file becomes
the batch file (``batch``): a duplicate of the held descriptor, one image per BYTES element found
by reading the lengths only, read in place by the workers, so no image byte passes through the front
and an unregister meanwhile cannot pull the file away. An output asked for into a region is written
through the held file reopened for writing (``write``). A region is closed on unregister and at
server stop.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from infer_proto import inference_pb2
from infer_server.front.errors import (
    Conflict,
    InvalidBatch,
    Overloaded,
    PermissionDeniedError,
    ServerError,
    Unavailable,
    UnknownBatch,
    rpc_boundary,
)
from infer_server.front.identity import Identity
from infer_server.messages import ImageRef

if TYPE_CHECKING:
    from infer_server.front.handoff import BatchFile, Handoff

MAX_REGIONS = 64  # per caller: each holds a descriptor
_MAX_NAME = 256


@dataclass
class Region:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: int
    dev: int
    ino: int
    path: str  # relative to the shared directory
    owners: frozenset[int]
    real: str  # its real path (logs; never opened again)


class Regions:
    """The registered regions of every caller."""

    def __init__(self, handoff: Handoff, write_owners: frozenset[int] = frozenset()) -> None:
        self._handoff = handoff
        self._write_owners = write_owners  # whose files outputs may be written into (never root implicitly)
        self._regions: dict[tuple[str, str], Region] = {}
        self._lock = threading.Lock()  # registration runs in threads; use duplicates under it

    # ------------------------------------------------------------------------------ register
    def register(self, identity: Identity, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open and check the region's file (blocking: run it in a thread)."""
        if not name or len(name) > _MAX_NAME:
            raise InvalidBatch(f"a region needs a name of 1 to {_MAX_NAME} characters")
        rel = key.lstrip("/")
        if not rel or "\x00" in rel or len(key) > self._handoff.limits.max_path_bytes:
            raise InvalidBatch("the region's key must name a file in the server's shared directory")
        with self._lock:
            if (identity.name, name) in self._regions:
                raise Conflict(f"a region named {name!r} is registered already; unregister it first")
            if self._count(identity) >= MAX_REGIONS:
                raise Overloaded(f"this caller has {MAX_REGIONS} regions registered, its limit")
        fd, st, real = self._handoff.open_file(rel, identity.file_owners)  # relative: beneath the shared directory
        if offset < 0 or byte_size < 0 or offset + byte_size > st.st_size:
            os.close(fd)
            raise InvalidBatch(f"offset {offset} + byte_size {byte_size} lies outside the file ({st.st_size} bytes)")
        region = Region(name, key, offset, byte_size, fd, st.st_dev, st.st_ino, rel, identity.file_owners, real)
        with self._lock:  # again: a concurrent call may have registered meanwhile
            if (identity.name, name) in self._regions or self._count(identity) >= MAX_REGIONS:
                os.close(fd)
                raise Conflict(f"a region named {name!r} is registered already, or this caller has {MAX_REGIONS}")
            self._regions[(identity.name, name)] = region

    def _count(self, identity: Identity) -> int:
        return sum(owner == identity.name for owner, _ in self._regions)

    def unregister(self, identity: Identity, name: str) -> None:
        with self._lock:
            names = [name] if name else [n for owner, n in self._regions if owner == identity.name]
            for n in names:
                region = self._regions.pop((identity.name, n), None)
                if region is None:
                    raise UnknownBatch(f"no shared memory region named {n!r} is registered")
                os.close(region.fd)

    def status(self, identity: Identity, name: str) -> inference_pb2.SystemSharedMemoryStatusResponse:
        reply = inference_pb2.SystemSharedMemoryStatusResponse()
        with self._lock:
            mine = {n: r for (owner, n), r in self._regions.items() if owner == identity.name}
        if name and name not in mine:
            raise UnknownBatch(f"no shared memory region named {name!r} is registered")
        for n, r in mine.items():
            if not name or n == name:
                reply.regions[n].CopyFrom(reply.RegionStatus(name=n, key=r.key, offset=r.offset, byte_size=r.byte_size))
        return reply

    def close(self) -> None:
        """Server stop: every region goes."""
        with self._lock:
            for region in self._regions.values():
                os.close(region.fd)
            self._regions.clear()

    # ----------------------------------------------------------------------------------- use
    def region(self, identity: Identity, name: str) -> Region:
        with self._lock:
            region = self._regions.get((identity.name, name))
        if region is None:
            raise UnknownBatch(f"no shared memory region named {name!r} is registered")
        return region

    def write(self, identity: Identity, parameters: Mapping[str, Any], data: bytes) -> None:
        """Write an output into the range its parameters name (blocking: run it in a thread). The
        range must hold it, within the region; the file is written through the region's own open
        file, reopened for writing (``/proc/self/fd``), never by its path."""
        name, offset, size = _range(parameters)
        if len(data) > size:
            raise InvalidBatch(f"the output needs {len(data)} bytes; region {name!r} offers {size}")
        region, fd = self._checked(identity, name, offset, size)
        try:
            st = os.fstat(fd)
            if region.offset + offset + len(data) > st.st_size:
                raise InvalidBatch(f"region {name!r}'s file shrank under it")
            if st.st_uid not in self._write_owners or not st.st_mode & stat.S_IWUSR:
                raise PermissionDeniedError(
                    f"outputs are written only into files their owner may write, of a uid in --region-write-owners "
                    f"(region {name!r}'s file is not)"
                )
            try:  # non-blocking: a lease on the file (F_SETLEASE) would make a plain open wait for it
                out = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except PermissionError:
                raise PermissionDeniedError(f"the server may not write region {name!r}'s file") from None
            except BlockingIOError:
                raise Unavailable(f"region {name!r}'s file is leased by another process; retry") from None
            try:
                if os.pwrite(out, data, region.offset + offset) != len(data):
                    raise InvalidBatch(f"region {name!r} took fewer bytes than the output has")
            finally:
                os.close(out)
        finally:
            os.close(fd)

    def write_all(self, identity: Identity, writes: Sequence[tuple[Mapping[str, Any], bytes]]) -> None:
        """``write`` each (parameters, output) in turn (blocking: run it in a thread)."""
        for parameters, data in writes:
            self.write(identity, parameters, data)

    def batch(self, identity: Identity, parameters: Mapping[str, Any], count: int) -> tuple[BatchFile, list[int]]:
        """The input's images as a batch file the workers read in place (blocking: run it in a
        thread): the region's file through a descriptor of its own, one image per BYTES element
        of the range, found by reading the 4-byte lengths only; and the images' sizes. No image
        byte passes through the front."""
        name, offset, size = _range(parameters)
        region, fd = self._checked(identity, name, offset, size)
        try:
            st = os.fstat(fd)
            start = region.offset + offset
            if start + size > st.st_size:
                raise InvalidBatch(f"region {name!r}'s file shrank to {st.st_size} bytes")
            elements = bytes_elements(lambda pos: os.pread(fd, 4, pos), start, start + size, count)
            refs = tuple(ImageRef(index, offset, length) for index, (offset, length) in enumerate(elements))
            return self._handoff.adopt(fd, st, region.real, refs), [r.size for r in refs]
        except BaseException:
            os.close(fd)
            raise

    def _checked(self, identity: Identity, name: str, offset: int, size: int) -> tuple[Region, int]:
        """The caller's region ``name``, if ``offset + size`` lies within it and its path still
        leads to the file registered (a replaced one drops the region), and a descriptor of its
        own of the file, taken under the lock while the region is known to be registered (the held
        one's number may name another file the moment it is closed)."""
        limit = self._handoff.limits.max_bytes + 4 * self._handoff.limits.max_images
        with self._lock:
            region = self._regions.get((identity.name, name))
        if region is None:
            raise UnknownBatch(f"no shared memory region named {name!r} is registered")
        if offset < 0 or size < 0 or offset + size > region.byte_size:
            raise InvalidBatch(f"offset {offset} + byte_size {size} lies outside region {name!r} "
                               f"({region.byte_size} bytes)")  # fmt: skip
        if size > limit:
            raise InvalidBatch(f"an input holds at most {limit} bytes")
        same = self._same_file(region)  # a path walk: outside the lock
        with self._lock:
            if self._regions.get((identity.name, name)) is not region:
                raise UnknownBatch(f"no shared memory region named {name!r} is registered")
            if not same:
                del self._regions[(identity.name, name)]
                os.close(region.fd)
                raise PermissionDeniedError(f"region {name!r}'s file was replaced or removed; register it again")
            return region, os.dup(region.fd)

    def _same_file(self, region: Region) -> bool:
        """The region's path still leads (by the same checks) to the file that was registered."""
        try:
            fd, st, _ = self._handoff.open_file(region.path, region.owners)
        except (OSError, ServerError):
            return False
        os.close(fd)
        return (st.st_dev, st.st_ino) == (region.dev, region.ino)

    # ------------------------------------------------------------------------------ handlers
    def handlers(self, identify: Callable[..., Identity]) -> dict[str, grpc.RpcMethodHandler]:
        p = inference_pb2

        @rpc_boundary
        async def register(_: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = identify(context, "SystemSharedMemoryRegister")
            await asyncio.to_thread(self.register, identity, request.name, request.key, request.offset,
                                    request.byte_size)  # fmt: skip
            return p.SystemSharedMemoryRegisterResponse()

        @rpc_boundary
        async def unregister(_: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.unregister(identify(context, "SystemSharedMemoryUnregister"), request.name)
            return p.SystemSharedMemoryUnregisterResponse()

        @rpc_boundary
        async def status(_: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return self.status(identify(context, "SystemSharedMemoryStatus"), request.name)

        def unary(fn: Callable[..., Any], req: Any, rep: Any) -> grpc.RpcMethodHandler:
            call = functools.partial(fn, None)  # rpc_boundary wraps methods: no self here
            return grpc.unary_unary_rpc_method_handler(call, req.FromString, rep.SerializeToString)

        return {
            "SystemSharedMemoryRegister": unary(register, p.SystemSharedMemoryRegisterRequest,
                                                p.SystemSharedMemoryRegisterResponse),  # fmt: skip
            "SystemSharedMemoryUnregister": unary(unregister, p.SystemSharedMemoryUnregisterRequest,
                                                  p.SystemSharedMemoryUnregisterResponse),  # fmt: skip
            "SystemSharedMemoryStatus": unary(status, p.SystemSharedMemoryStatusRequest,
                                              p.SystemSharedMemoryStatusResponse),  # fmt: skip
        }


def _range(parameters: Mapping[str, Any]) -> tuple[str, int, int]:
    """(region, offset, byte size) of a tensor's shared-memory parameters."""
    if "shared_memory_byte_size" not in parameters:
        raise InvalidBatch("a tensor in shared memory needs shared_memory_byte_size")
    offset = parameters["shared_memory_offset"].int64_param if "shared_memory_offset" in parameters else 0
    return parameters["shared_memory_region"].string_param, offset, parameters["shared_memory_byte_size"].int64_param


def bytes_elements(head: Callable[[int], bytes], start: int, end: int, count: int) -> list[tuple[int, int]]:
    """(offset, length) of each of the ``count`` elements of a BYTES tensor's raw form between
    ``start`` and ``end`` (each a 4-byte little-endian length, then that many bytes), reading only
    the lengths (``head(pos)``: the 4 bytes at ``pos``); ``InvalidBatch`` unless they fill the range
    exactly. Also how ``front.oip`` splits inline tensors."""
    elements, pos = [], start
    for index in range(count):
        length_bytes = head(pos) if pos + 4 <= end else b""
        if len(length_bytes) != 4:
            raise InvalidBatch(f"IMAGES element {index}: the data ends before its length")
        length = int.from_bytes(length_bytes, "little")
        if pos + 4 + length > end:
            raise InvalidBatch(f"IMAGES element {index}: its length ({length}) runs past the data")
        elements.append((pos + 4, length))
        pos += 4 + length
    if pos != end:
        raise InvalidBatch(f"IMAGES holds {end - pos} bytes after its {count} elements")
    return elements
