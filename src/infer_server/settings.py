"""Server configuration: every knob of the gRPC front, the supervisor and the stage workers, in one place.

Each field is reachable three ways, derived from this model and nowhere else: a command-line flag
of ``infer-server serve`` (``--<field-name>``, built by ``infer_server.cli``), an environment
variable ``INFER_<FIELD_NAME>`` and the default below; a flag beats the environment, which beats
the default. The front reads the settings in the server's main process; the workers get the part
they need as one ``WorkerOptions`` record (``worker_options``). Limits live here so that "bounded
everything" (docs/architecture.md) has one list to audit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infer_proto.addresses import is_loopback
from infer_server.event_loop import EventLoop
from infer_server.messages import WorkerOptions

MiB = 1024 * 1024


def parse_uids(text: str) -> frozenset[int]:
    """A comma-separated list of numeric uids (``--file-owners``, a tokens file's third field)."""
    try:
        uids = frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError("file owners are numeric uids separated by commas") from None
    if any(uid < 0 for uid in uids):
        raise ValueError("file owners: a uid is not negative")
    return uids


class ServerSettings(BaseSettings):
    """Settings of one server process; environment variables are ``INFER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFER_", extra="forbid", validate_default=True)

    # Where and what to serve.
    models_dir: Path = Field(
        default=Path("engines/models"),
        description="Model repository directory (relative paths are taken from the working directory).",
        json_schema_extra={"flags": ["--models"]},
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address to bind: tmpfs handoff is a same-host protocol. Any address but loopback needs TLS "
        "(--tls-cert, --tls-key) or --insecure.",
    )
    port: int = Field(default=8001, ge=0, le=65535, description="Port to bind; 0 picks a free one (it is reported).")
    unix_socket: Path | None = Field(
        default=None,
        description="Also listen on this Unix-domain socket (created 0600: only the server's user may connect).",
    )
    local_socket: Path | None = Field(
        default=None,
        description="Also serve the server's calls without gRPC on this Unix-domain socket, for clients on this host "
        "(created 0600): less than half gRPC's CPU per call, in the server and the client (docs/local-socket.md).",
    )
    shm_dir: Path = Field(default=Path("/dev/shm/infer"), description="Shared directory clients write batches into.")
    staging_dir: Path | None = Field(
        default=None,
        description="Server-owned copies of inline data; clients' paths may never point into it "
        "(default: <shm-dir>/.server).",
    )
    spill_dir: Path | None = Field(
        default=None,
        description="A directory on disk, outside the shared directory, where inline batches are staged while the "
        "staging directory's file system is over --spill-at in use (or full): the server keeps accepting work.",
    )
    spill_at: float = Field(
        default=0.8, gt=0, le=1, description="Share of the staging file system in use above which staging spills."
    )
    device: Literal["cpu", "gpu"] = Field(default="cpu", description="cpu (ONNX Runtime) or gpu (TensorRT).")
    workers: int = Field(default=2, ge=1, le=64, description="Stage worker processes.")
    fronts: int = Field(
        default=0, ge=0, le=64,
        description="gRPC front processes: each serves the port (SO_REUSEPORT) and relays its calls to the main "
        "process, so gRPC's per-message work uses that many cores; 0: the main process speaks gRPC itself.",
    )  # fmt: skip
    shards: int = Field(
        default=1, ge=1, le=16,
        description="Data planes: processes that each admit, hand off and answer their own share of the local "
        "socket's clients (<local-socket>, <local-socket>.1, ...) with their share of the workers and budgets; the "
        "client library routes. Needs --local-socket; about one per core (docs/front-scaling.md, Shards).",
    )  # fmt: skip
    shard_index: int = Field(
        default=0, ge=0, le=15, description="Which shard this process is: set by the server for those it starts.",
        json_schema_extra={"internal": True},
    )  # fmt: skip
    realtime_priority: int = Field(
        default=0, ge=0, le=99,
        description="Run the main process's event loop (admission, hand-offs, results, replies) at SCHED_FIFO "
        "priority N: it then runs as soon as it has work instead of queueing behind the processes it wakes. Its "
        "workers and other threads stay at the normal policy. Needs CAP_SYS_NICE or RLIMIT_RTPRIO >= N, else the "
        "server does not start; 0: the normal policy (docs/performance.md).",
    )  # fmt: skip
    event_loop: EventLoop = Field(
        default="uvloop",
        description="The event loop of the main process, its shards and front processes: uvloop (libuv's, in C; "
        "5-12% fewer instructions per push) or asyncio's own (docs/performance.md, The event loop).",
    )  # fmt: skip
    batch_size: int = Field(default=8, ge=1, le=256, description="Images per pipeline batch (a chunk).")
    dynamic_batching: bool = Field(
        default=True,
        description="A worker runs the chunks waiting for it together, up to --batch-size images, as one model "
        "batch: single-image requests from many clients fill the batches the models see.",
    )
    max_queue_delay_us: int = Field(
        default=0, ge=0, le=1_000_000,
        description="With dynamic batching, how long after its oldest chunk was submitted a batch that is not "
        "full waits for more chunks (Triton's max_queue_delay_microseconds). 0: run what is waiting, no wait.",
    )  # fmt: skip
    intra_op_threads: int = Field(default=1, ge=1, le=64, description="Threads per model in each worker.")
    pin_workers: bool = Field(
        default=False,
        description="Pin each stage worker, with its libraries' threads, to its own --intra-op-threads CPUs of "
        "the server's CPU set, in turn: a worker never migrates, and its hand-offs to the decoder's threads stay "
        "on its core. Only where those CPUs are this server's alone (docs/workers.md).",
    )  # fmt: skip
    max_attempts: int = Field(
        default=2, ge=1, le=5, description="Attempts per image when workers die under it (2: retried once)."
    )
    max_chunk_seconds: float = Field(
        default=60.0, gt=0,
        description="A worker still on one chunk after this long is replaced; the chunk's images are retried "
        "one by one, so the image that holds it up fails alone.",
    )  # fmt: skip
    worker_memory_mib: int | None = Field(
        default=2048, ge=0,
        description="A worker whose resident memory passes this after a chunk is replaced, so the memory a huge "
        "image grew it by goes back to the system; on cpu its data segment may also grow by at most twice this "
        "beyond what loading the models took (RLIMIT_DATA). 0: no bound.",
    )  # fmt: skip
    null_model: bool = Field(
        default=False,
        description="Benchmarking the data path: read and header-check every image, run no model, return "
        "the header's size and no detections.",
    )
    plan_cache_dir: Path | None = Field(
        default=None, description="Where TensorRT plans are cached (device gpu; default ~/.cache/infer_server/plans)."
    )

    # Who may call (docs/security.md).
    tokens_file: Path | None = Field(
        default=None,
        description="Bearer tokens, one caller per line: '<identity> <token> [<uid>,...]'. When set, every call "
        "but health must carry 'authorization: Bearer <token>'; the file must be private (chmod 600).",
    )
    tls_cert: Path | None = Field(default=None, description="PEM certificate chain: serve TCP over TLS.")
    tls_key: Path | None = Field(default=None, description="PEM private key of --tls-cert.")
    tls_client_ca: Path | None = Field(
        default=None,
        description="PEM CA bundle: require client certificates it signed (mutual TLS); without a tokens file the "
        "certificate's common name is the caller's identity.",
    )
    insecure: bool = Field(
        default=False, description="Serve plaintext on an address other than loopback (e.g. only inside a pod)."
    )
    region_write_owners: str | None = Field(
        default=None,
        description="Comma-separated uids whose files (Open Inference Protocol shared-memory regions) outputs may "
        "be written into. Default: the server's own uid, or none when the server runs as root.",
    )
    file_owners: str = Field(
        default="",
        description="Comma-separated uids whose files a caller may push by path when its token line names none "
        "(default: the server's own uid).",
    )

    # Models that change while the server runs (front/control.py, README "Model lifecycle").
    model_control: Literal["explicit", "none"] = Field(
        default="explicit",
        description="explicit: callers named in --control-callers may load, unload and roll back models over the "
        "ModelControlService; none: the models change only with a restart (listing stays open).",
    )
    control_callers: str | None = Field(
        default=None,
        description="Comma-separated identities that may change models. Default: 'anonymous' (every caller of a "
        "server without credentials) when the server listens on loopback only, else nobody; with a tokens file "
        "or mutual TLS, name the operators' identities.",
    )
    repository_poll_s: float | None = Field(
        default=None, gt=0,
        description="Read the model repository again this often and move to what it holds when its files change "
        "(a new version directory, a new config); off by default.",
    )  # fmt: skip
    reload_timeout_s: float = Field(
        default=300.0, gt=0, description="A model change must have every worker on the new models within it."
    )
    drift_window: int = Field(
        default=500, ge=0,
        description="Images in the drift watch's sliding window (compared with the detector's reference profile, "
        "profile.json); 0: no drift watch.",
    )  # fmt: skip
    drift_interval_s: float = Field(default=10.0, gt=0, description="Seconds between drift evaluations.")
    drift_threshold: float = Field(
        default=0.25, gt=0, description="A statistic whose population stability index passes this is flagged."
    )
    drift_min_images: int = Field(default=200, ge=1, description="Images the window needs before it is judged.")
    shadow_budget: float = Field(
        default=0.1, gt=0, le=1,
        description="Shadow runs of a candidate may take at most this share of the time each worker spends on "
        "answered chunks (sampled shadow chunks over it are skipped and counted).",
    )  # fmt: skip

    # The result cache (front/result_cache.py; docs/performance.md has what it costs and buys).
    result_cache_entries: int = Field(
        default=0, ge=0,
        description="Results kept by image hash (per caller and model versions) to answer repeats without "
        "decode or inference; 0: no cache. LRU-K eviction.",
    )  # fmt: skip
    result_cache_mib: int = Field(default=64, ge=1, description="Memory the result cache may hold, in MiB.")
    result_cache_k: int = Field(
        default=2, ge=1, le=8, description="K of LRU-K: an entry ranks by its K-th most recent use (1: plain LRU)."
    )

    # Per-batch limits (checked before anything is read or admitted).
    max_batch_images: int = Field(default=256, ge=1, description="Images per pushed batch.")
    max_batch_bytes: int = Field(default=256 * MiB, ge=1, description="Bytes per pushed batch.")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1, description="Pixels per image, checked from the header before decoding."
    )
    max_name_bytes: int = Field(default=1024, ge=1, description="Bytes (UTF-8) per image name.")
    max_path_bytes: int = Field(default=4096, ge=1, description="Bytes (UTF-8) of a batch file's path.")
    max_request_id_bytes: int = Field(default=128, ge=1, description="Bytes (UTF-8) of a request_id.")

    # Per-server limits: admission control answers RESOURCE_EXHAUSTED beyond these.
    max_inflight_images: int = Field(default=1024, ge=1, description="Images in flight per server.")
    max_inflight_bytes: int = Field(default=1024 * MiB, ge=1, description="Bytes in flight per server.")
    max_concurrent_rpcs: int = Field(
        default=256, ge=1,
        description="Concurrent RPCs, streams included (and as many again, and connections, on --local-socket).",
    )  # fmt: skip
    max_streams: int | None = Field(
        default=None, ge=1,
        description="Open PullResult and Session streams per server (default: three quarters of "
        "--max-concurrent-rpcs, so pushes and health checks always find room).",
    )  # fmt: skip
    max_retained_batches: int = Field(
        default=16384, ge=1,
        description="Finished batches kept for pulling per server (beyond it, the largest holder's oldest go).",
    )  # fmt: skip
    max_message_bytes: int = Field(
        default=64 * MiB,
        ge=MiB,
        description="Largest gRPC message: inline pushes must fit in one; a larger one is INVALID_ARGUMENT.",
    )

    # Per-caller quotas (a caller is an identity: docs/security.md); one caller's flood never costs
    # another its results.
    max_inflight_images_per_identity: int | None = Field(
        default=None, ge=1, description="Images in flight per caller (default: --max-inflight-images)."
    )
    max_inflight_bytes_per_identity: int | None = Field(
        default=None, ge=1, description="Bytes in flight per caller (default: --max-inflight-bytes)."
    )
    max_retained_batches_per_identity: int = Field(
        default=4096, ge=1, description="Finished batches kept for pulling per caller (then its own oldest go)."
    )
    max_streams_per_identity: int = Field(
        default=64, ge=1, description="Open PullResult and Session streams per caller."
    )

    # Time bounds.
    batch_deadline_s: float = Field(
        default=120.0, gt=0, description="Seconds a batch may take (then DEADLINE_EXCEEDED).",
        json_schema_extra={"flags": ["--batch-deadline"]},
    )  # fmt: skip
    result_ttl_s: float = Field(
        default=300.0, gt=0, description="Seconds finished results are kept for pulling.",
        json_schema_extra={"flags": ["--result-ttl"]},
    )  # fmt: skip
    janitor_ttl_s: float = Field(default=900.0, gt=0, description="Orphaned staging files older than this are removed.")
    janitor_interval_s: float = Field(default=60.0, gt=0, description="Seconds between staging-directory sweeps.")
    upkeep_interval_s: float = Field(
        default=1.0, gt=0, description="Seconds between passes of the front's consistency task (see front/upkeep.py)."
    )
    startup_timeout_s: float = Field(default=180.0, gt=0, description="Every worker must be ready within it.")
    drain_timeout_s: float = Field(default=30.0, ge=0, description="On stop, in-flight batches may finish within it.")
    stop_grace_s: float = Field(default=5.0, ge=0, description="On stop, open streams may end within it.")
    stream_idle_timeout_s: float = Field(
        default=300.0, gt=0,
        description="A Session stream with nothing in flight and no push for this long is ended (UNAVAILABLE).",
    )  # fmt: skip
    keepalive_s: float = Field(
        default=60.0, gt=0,
        description="Ping connections with open calls this often and drop the ones that do not answer within "
        "--keepalive-timeout-s (a frozen or vanished client frees its streams); clients may ping at most every 10 s.",
    )  # fmt: skip
    keepalive_timeout_s: float = Field(default=20.0, gt=0, description="How long a keepalive ping may go unanswered.")

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO", description="DEBUG, INFO, WARNING or ERROR (the workers' too)."
    )
    metrics_port: int | None = Field(default=None, ge=0, le=65535, description="Serve Prometheus metrics on this port.")

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_case_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _resolve_dirs(self) -> ServerSettings:
        self.shm_dir = Path(self.shm_dir).absolute()
        if self.staging_dir is None:
            self.staging_dir = self.shm_dir / ".server"
        self.staging_dir = Path(self.staging_dir).absolute()
        self.models_dir = Path(self.models_dir).absolute()
        if self.shm_dir == self.staging_dir or self.staging_dir in self.shm_dir.parents:
            raise ValueError("staging_dir must not be the shared directory or contain it (its files are deleted)")
        if self.max_batch_images > self.max_inflight_images:
            raise ValueError("max_batch_images must not exceed max_inflight_images")
        if self.worker_memory_mib and self.worker_memory_mib < 256:
            raise ValueError("worker_memory_mib is 0 (no bound) or at least 256")
        self.owner_uids()
        if self.max_streams is None:
            self.max_streams = max(1, self.max_concurrent_rpcs * 3 // 4)
        return self

    @model_validator(mode="after")
    def _check_listeners(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS first)")
        if not (is_loopback(self.host) or self.tls_cert or self.insecure):
            raise ValueError(
                f"host {self.host} is reachable from the network: serve TLS (--tls-cert, --tls-key) or, where only "
                "trusted peers can reach it (a pod's sidecar), say so with --insecure"
            )
        if self.tls_client_ca and (self.unix_socket or self.local_socket) and not self.tokens_file:
            raise ValueError("callers on a Unix socket have no client certificate: give them tokens (--tokens-file)")
        if self.local_socket is not None and self.local_socket == self.unix_socket:
            raise ValueError("--local-socket and --unix-socket are two sockets: give them two paths")
        if self.shard_index >= self.shards:
            raise ValueError("shard_index is the server's own, below shards")
        if self.shards > 1 and self.local_socket is None:
            raise ValueError("--shards needs --local-socket (the shards' clients reach them there)")
        return self

    def owner_uids(self) -> frozenset[int]:
        """The uids of ``file_owners`` (the server's own when empty)."""
        if not self.file_owners.strip():
            return frozenset({os.geteuid()})
        return parse_uids(self.file_owners)

    @property
    def staging(self) -> Path:
        """The staging directory, always set after validation."""
        assert self.staging_dir is not None
        return self.staging_dir

    @property
    def log_mark(self) -> str:
        """What marks this process's log lines (and its workers') as one shard's, where there are
        several: before the level, so that what follows (``infer_server.audit: {...}``) reads as ever."""
        return f"[shard {self.shard_index}] " if self.shards > 1 else ""

    def write_owners(self) -> frozenset[int]:
        """The uids of ``region_write_owners`` (or its default)."""
        if self.region_write_owners is not None:
            return frozenset(parse_uids(self.region_write_owners)) if self.region_write_owners.strip() else frozenset()
        return frozenset() if os.geteuid() == 0 else frozenset({os.geteuid()})

    def operators(self) -> frozenset[str]:
        """The identities that may change models (``control_callers`` or its default)."""
        if self.control_callers is not None:
            return frozenset(c.strip() for c in self.control_callers.split(",") if c.strip())
        return frozenset({"anonymous"}) if is_loopback(self.host) else frozenset()

    def worker_options(self) -> WorkerOptions:
        """What every stage worker is told at spawn."""
        return WorkerOptions(
            device=self.device,
            batch_size=self.batch_size,
            max_image_pixels=self.max_image_pixels,
            intra_op_threads=self.intra_op_threads,
            null_model=self.null_model,
            plan_cache_dir=str(self.plan_cache_dir) if self.plan_cache_dir else None,
            log_level=self.log_level,
            log_mark=self.log_mark,
            memory_mib=self.worker_memory_mib or None,
            digest_images=self.result_cache_entries > 0,
            shadow_budget=self.shadow_budget,
            dynamic_batching=self.dynamic_batching,
            max_queue_delay_us=self.max_queue_delay_us,
            cpus=tuple(sorted(os.sched_getaffinity(0))) if self.pin_workers else (),
        )
