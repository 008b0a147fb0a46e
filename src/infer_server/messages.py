"""Everything that crosses a process boundary: between the supervisor (server process) and the
stage workers (children), and the file reference the front hands the supervisor.

Pipes carry only these small frozen records (docs/architecture.md has the table of who sends what).
Image bytes never travel through a pipe: a ``WorkItem`` names a file in tmpfs (the client's batch
file or the server's own staging copy of inline data, a ``FileRef``) plus byte ranges inside it;
the worker opens the front's descriptor of the file and reads each image's bytes once, with
``pread``.

To a worker: ``WorkerOptions`` as a process argument at spawn; then in its inbox a ``WorkItem`` per
chunk and ``STOP`` at the end. From a worker, on its result pipe: ``WorkerReady`` or
``WorkerFailed`` once, then one ``ItemDone`` per chunk, in one message (a tuple) for the chunks
it ran together. Shared memory: each worker's ``current`` value (a
``multiprocessing.RawValue('q')``) holds the id of the chunk it took last; the supervisor reads it
when the worker dies to know which chunk was running. Pipes carry messages written by ``dumps``
and read by ``loads``.

Everything here must stay picklable with the standard library only (spawn context), and nothing a
client sent is ever unpickled: the front builds these records from validated request fields.

The two records that cross for every chunk, ``WorkItem`` and ``ItemDone``, cross as rows of plain
values (``marshal``led; pickled when an answer holds detections, through ``__reduce__``) rebuilt
in one call per message (``records.rebuilder``), not as dataclasses rebuilt field name by field
name (docs/performance.md and docs/workers.md have the measurements).
"""

from __future__ import annotations

import enum
import marshal
import pickle
from dataclasses import dataclass, field, fields
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar

from infer_server.records import fast_init, rebuilder
from infer_server.records import replaced as replaced  # the data path's copy of a record, from here

_T = TypeVar("_T")

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

STOP = None  # the stop marker in a worker's inbox
# The stages a worker times, in order: the keys of ``ImageOutcome.timings_ms`` besides ``queue``.
STAGES = ("read", "decode", "detector", "postprocess", "crop", "attributes")


class Code(enum.IntEnum):
    """Per-image status codes. Values are gRPC status codes so the front maps them 1:1."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    ABORTED = 10
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15


@fast_init
@dataclass(frozen=True)
class ImageRef:
    """One image inside a batch file: its index in the batch and its byte range."""

    index: int
    offset: int
    size: int
    name: str = ""


@fast_init
@dataclass(frozen=True)
class FileRef:
    """A batch file the front validated and holds open until its batch is done.

    A worker reads it through the front's descriptor (``/proc/<server pid>/fd/<fd>``), never by
    ``path``, so nothing swapped in at the path after validation (a FIFO, a symlinked directory) is
    ever opened; it still checks device, inode and size on what it opened, which also refuses a
    descriptor number the front has since reused for another file, and a staged copy's ``tag``."""

    path: str  # for logs and the staging janitor; never opened by a worker
    dev: int
    ino: int
    size: int
    fd: int  # the front's descriptor of the file
    # A staged copy's first bytes, unique to this staging of it (``front.staging``): a file rewritten
    # for a later batch fails the check of a chunk of an earlier one still in a worker's hands.
    tag: bytes = b""


@dataclass(frozen=True)
class WorkerOptions:
    """What every stage worker is told at spawn; built once from the server's settings
    (``ServerSettings.worker_options``), which hold every default."""

    device: str
    batch_size: int
    max_image_pixels: int
    intra_op_threads: int
    null_model: bool  # read + header check only, no decode or model (benchmarks the data path)
    plan_cache_dir: str | None  # TensorRT plans (device gpu); None: the backend's default
    log_level: str
    log_mark: str = ""  # before the level in its log lines: its shard's, where there are several
    memory_mib: int | None = None  # resident memory after which the worker retires (RETIRED_EXIT)
    digest_images: bool = False  # hash what was read into each outcome (the front caches results)
    # The operator's model choices (the control API): model name → version served instead of the
    # version policy's choice, and the classifiers left out.
    pins: tuple[tuple[str, str], ...] = ()
    unloaded: tuple[str, ...] = ()
    # A candidate under trial (canary or shadow): its model → version, loaded beside the stable
    # pipeline (sharing every engine that is the same), and the share of answered-path time its
    # shadow runs may take (``stage.shadow``).
    candidate: tuple[tuple[str, str], ...] = ()
    shadow_budget: float = 0.1
    # Dynamic batching (``stage.gather``): chunks waiting together run as one batch, a batch not
    # full waiting up to this long after its oldest chunk was submitted.
    dynamic_batching: bool = True
    max_queue_delay_us: int = 0
    # The CPUs the workers are pinned to (``--pin-workers``): worker N gets ``intra_op_threads`` of
    # them in turn from the N-th share on (``stage.worker.pin_cpus``). Empty: not pinned.
    cpus: tuple[int, ...] = ()


# The exit code of a worker that retired on purpose after a chunk because its resident memory passed
# ``WorkerOptions.memory_mib`` (a huge image grew it): the pool replaces it like a dead one, and
# nothing it held is lost or counted as an attempt (its last chunk was answered first).
RETIRED_EXIT = 75
# The exit code of a worker whose pipeline failed on a chunk (e.g. an allocation over its memory cap):
# the chunk is not answered, and the pool retries its images one per chunk on a fresh worker.
FAILED_EXIT = 70


@fast_init
@dataclass(frozen=True)
class WorkItem:
    """A chunk of one batch (at most the pipeline's batch size) handed to a stage worker.

    The worker reads ``file`` through the front's descriptor and refuses what it opened unless it
    has the identity and size of ``file``. ``deadline`` is ``time.monotonic()`` based (CLOCK_MONOTONIC is
    shared by all processes of the host); work dequeued after it is answered DEADLINE_EXCEEDED.
    ``attempt`` counts how often this chunk was handed out (retries after a worker died).
    """

    item_id: int
    batch_id: str
    file: FileRef
    images: tuple[ImageRef, ...]
    deadline: float
    attempt: int = 1
    submitted: float = 0.0  # time.monotonic() when its batch was submitted (for the queue timing)
    route: int = 0  # ROUTE_STABLE, ROUTE_CANARY (the candidate answers) or ROUTE_SHADOW (it runs too)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _work_item, (_WORK_ITEM_ROW(self), _FILE_ROW(self.file), tuple(map(_REF_ROW, self.images)))


ROUTE_STABLE, ROUTE_CANARY, ROUTE_SHADOW = 0, 1, 2


# A worker makes a Box and a DetectionRecord per detection, an AttributeRecord per attribute.
@fast_init
@dataclass(frozen=True)
class Box:
    x1: float
    y1: float
    x2: float
    y2: float


@fast_init
@dataclass(frozen=True)
class AttributeRecord:
    model: str
    label: str
    score: float


@fast_init
@dataclass(frozen=True)
class DetectionRecord:
    class_id: int
    label: str
    score: float
    box: Box
    attributes: tuple[AttributeRecord, ...] = ()


@fast_init
@dataclass(frozen=True)
class ImageOutcome:
    """The terminal record for one image: detections, or a per-image error (code != OK).

    ``timings_ms`` holds this image's share of each stage's wall time (``decode``, ``detector``,
    ``postprocess``, ``attributes``, ...) and ``queue_ms`` the time its chunk waited for a worker.
    """

    batch_id: str
    index: int
    name: str
    code: Code = Code.OK
    message: str = ""
    width: int = 0
    height: int = 0
    detections: tuple[DetectionRecord, ...] = ()
    timings_ms: tuple[tuple[str, float], ...] = ()
    worker: int = -1
    cached: bool = False  # answered from the front's result cache: no decode or inference ran
    digest: bytes = b""  # BLAKE2b-128 of the bytes the worker read (WorkerOptions.digest_images)
    models: tuple[tuple[str, str], ...] = ()  # (name, version) of the models that answered
    input_stats: tuple[float, ...] = ()  # brightness, contrast of the decoded image (drift watch)
    batch_images: int = 0  # images the pipeline ran together with it (dynamic batching); 0: not known

    @classmethod
    def failed(cls, batch_id: str, ref: ImageRef, code: Code, message: str) -> ImageOutcome:
        return cls(batch_id=batch_id, index=ref.index, name=ref.name, code=code, message=message)


@dataclass(frozen=True)
class WorkerReady:
    """Sent once by a worker after ``setup()`` loaded every model."""

    worker: int
    pid: int
    models: tuple[tuple[str, str], ...] = field(default=())  # (model name, version)
    candidate: tuple[tuple[str, str], ...] = field(default=())  # the candidate pipeline's, if one is loaded
    profile: str = ""  # the detector's reference profile (profile.json), for the drift watch
    catalog: tuple[tuple[str, str, tuple[str, ...]], ...] = field(default=())  # (name, kind, versions on disk)


@dataclass(frozen=True)
class WorkerFailed:
    """Sent by a worker whose ``setup()`` failed; the parent fails fast with this message."""

    worker: int
    message: str


@fast_init
@dataclass(frozen=True)
class ItemDone:
    """Every image of ``item_id`` answered: its ImageOutcomes, one per image, in one message.

    One message per chunk, not per image: a worker that dies mid-chunk has sent nothing of it, and
    the pool retries the chunk's images. Which chunk a worker had taken when it died the pool reads
    from the worker's shared ``current`` value, not from a message.
    """

    worker: int
    item_id: int
    outcomes: tuple[ImageOutcome, ...] = ()

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _item_done, (self.worker, self.item_id, tuple(map(_outcome_row, self.outcomes)))


@dataclass
class Agreement:
    """How far a candidate agreed with the stable versions over the images compared (what
    ``stage.shadow.compare`` counts; the front sums them per trial)."""

    images: int = 0
    stable_detections: int = 0
    candidate_detections: int = 0
    matched: int = 0
    labels_agree: int = 0
    attributes_compared: int = 0
    attributes_agree: int = 0

    def add(self, other: Agreement) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def detection_agreement(self) -> float:
        total = self.stable_detections + self.candidate_detections
        return 1.0 if total == 0 else 2 * self.labels_agree / total

    @property
    def attribute_agreement(self) -> float:
        return 1.0 if self.attributes_compared == 0 else self.attributes_agree / self.attributes_compared


@dataclass(frozen=True)
class ShadowDone:
    """What a shadow run found on one chunk (the candidate ran on the images the stable models
    answered; its results went nowhere else), or that it was skipped to keep within its budget."""

    worker: int
    agreement: Agreement = field(default_factory=Agreement)
    skipped: bool = False


_REF_FIELDS = tuple(f.name for f in fields(ImageRef))
_REF_ROW = attrgetter(*_REF_FIELDS)
_FILE_FIELDS = tuple(f.name for f in fields(FileRef))
_FILE_ROW = attrgetter(*_FILE_FIELDS)
_WORK_ITEM_FIELDS = tuple(f.name for f in fields(WorkItem) if f.name not in ("file", "images"))
_WORK_ITEM_ROW = attrgetter(*_WORK_ITEM_FIELDS)
# An outcome's row: its code as a plain int (an enum member would unpickle through a Python call),
# then every other field.
_OUTCOME_FIELDS = tuple(f.name for f in fields(ImageOutcome) if f.name != "code")
_OUTCOME_ROW = attrgetter(*_OUTCOME_FIELDS)
_CODES = {int(code): code for code in Code}


def _outcome_row(outcome: ImageOutcome) -> tuple[int, tuple[Any, ...]]:
    return int(outcome.code), _OUTCOME_ROW(outcome)


_rebuild_refs = rebuilder(ImageRef)
# ImageRefs from rows of (index, offset, size, name), as a pipe message's are remade: a push's
# layout makes its images' records this way (``front.layout``).
image_refs = _rebuild_refs
_rebuild_outcomes = rebuilder(ImageOutcome, ("code", _CODES))


def _work_item(row: tuple[Any, ...], file: tuple[Any, ...], refs: tuple[tuple[Any, ...], ...]) -> WorkItem:
    item_id, batch_id, *rest = row
    return WorkItem(item_id, batch_id, FileRef(*file), tuple(_rebuild_refs(refs)), *rest)


def _item_done(worker: int, item_id: int, rows: tuple[tuple[int, tuple[Any, ...]], ...]) -> ItemDone:
    return ItemDone(worker, item_id, tuple(_rebuild_outcomes(rows)))


_WORK, _DONE = b"W", b"D"  # the first byte of a marshalled WorkItem, ItemDone tuple; a pickle's is 0x80


def dumps(message: Any) -> bytes:
    """``message`` as it crosses a pipe; ``loads`` reads it back. A ``WorkItem``, and a worker's
    answer (a tuple of ``ItemDone``) without detections, go as their rows of plain values
    ``marshal``led behind a byte that says which: the encoding a fifth of pickle's cost each way
    (pickle frames, memoizes and looks the rebuilding function up by name; marshal writes the
    values), the whole message about two thirds.
    Anything else is pickled (detections are records, which marshal does not take), without the
    ``ForkingPickler`` that ``Connection.send`` makes per message (a copy of its reducer table
    each time, for descriptors and sockets, which nothing here holds)."""
    if type(message) is WorkItem:
        rows = (_WORK_ITEM_ROW(message), _FILE_ROW(message.file), tuple(map(_REF_ROW, message.images)))
        return _WORK + marshal.dumps(rows)
    if type(message) is tuple and message and type(message[0]) is ItemDone:
        try:
            return _DONE + marshal.dumps(tuple((d.worker, d.item_id, tuple(map(_outcome_row, d.outcomes)))
                                               for d in message))  # fmt: skip
        except ValueError:  # a value marshal does not take: detections
            pass
    return pickle.dumps(message, pickle.HIGHEST_PROTOCOL)


def loads(data: bytes | memoryview) -> Any:
    """A message ``dumps`` wrote (or ``Connection.send``: a pickle)."""
    kind = data[:1]
    if kind == _WORK:
        return _work_item(*marshal.loads(data[1:]))
    if kind == _DONE:
        return tuple(_item_done(*done) for done in marshal.loads(data[1:]))
    return pickle.loads(data)


def send(conn: Connection, message: Any) -> None:
    """``conn.send(message)``, written by ``dumps``."""
    conn.send_bytes(dumps(message))
