"""Server configuration: every knob of the gRPC front and the stage-worker pool, in one place.

Built by ``infer_server.cli`` (command-line options override ``INFER_*`` environment variables,
which override the defaults below) and read by ``service.InferenceServer`` in the server's main
process. Limits live here so that "bounded everything" (DESIGN.md) has one list to audit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024

# src/infer_server/settings.py -> repository root (the demo's model repository lives there).
REPO_ROOT = Path(__file__).resolve().parents[2]


class ServerSettings(BaseSettings):
    """Settings of one server process; environment variables are ``INFER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="INFER_", extra="forbid", validate_default=True)

    # Where and what to serve.
    models_dir: Path = REPO_ROOT / "engines" / "models"
    host: str = "127.0.0.1"  # tmpfs handoff is a same-host protocol; containers set 0.0.0.0
    port: int = Field(default=8001, ge=0, le=65535)  # 0 = ephemeral, the bound port is reported
    shm_dir: Path = Path("/dev/shm/infer")
    # Server-owned copies of inline data; clients' paths may never point into it.
    staging_dir: Path | None = None  # default: <shm_dir>/.server
    device: Literal["cpu", "gpu"] = "cpu"
    workers: int = Field(default=2, ge=1, le=64)
    batch_size: int = Field(default=8, ge=1, le=256)
    intra_op_threads: int = Field(default=1, ge=1, le=64)
    max_attempts: int = Field(default=2, ge=1, le=5)  # a chunk is retried once if its worker dies
    # Benchmarking the data path alone: workers read and header-check every image but load and run
    # no model; each OK result has the header's width/height and no detections.
    null_model: bool = False

    # Per-batch limits (checked before anything is read or admitted).
    max_batch_images: int = Field(default=256, ge=1)
    max_batch_bytes: int = Field(default=256 * MiB, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_name_length: int = Field(default=1024, ge=1)

    # Per-server limits: admission control answers RESOURCE_EXHAUSTED beyond these.
    max_inflight_images: int = Field(default=1024, ge=1)
    max_inflight_bytes: int = Field(default=1024 * MiB, ge=1)
    max_concurrent_rpcs: int = Field(default=256, ge=1)
    # Inline pushes must fit in one message; remote clients split larger batches.
    max_message_bytes: int = Field(default=64 * MiB, ge=MiB)

    # Time bounds.
    batch_deadline_s: float = Field(default=120.0, gt=0)  # answered DEADLINE_EXCEEDED after it
    result_ttl_s: float = Field(default=300.0, gt=0)  # finished batches are forgotten after it
    janitor_ttl_s: float = Field(default=900.0, gt=0)  # orphaned staging files older than this go
    janitor_interval_s: float = Field(default=60.0, gt=0)
    startup_timeout_s: float = Field(default=180.0, gt=0)  # every worker must be READY within it
    drain_timeout_s: float = Field(default=30.0, ge=0)  # in-flight batches may finish within it
    stop_grace_s: float = Field(default=5.0, ge=0)  # open streams may end within it

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics_port: int | None = Field(default=None, ge=0, le=65535)

    @model_validator(mode="after")
    def _resolve_dirs(self) -> ServerSettings:
        self.shm_dir = Path(self.shm_dir).absolute()
        if self.staging_dir is None:
            self.staging_dir = self.shm_dir / ".server"
        self.staging_dir = Path(self.staging_dir).absolute()
        self.models_dir = Path(self.models_dir).absolute()
        if self.max_batch_images > self.max_inflight_images:
            raise ValueError("max_batch_images must not exceed max_inflight_images")
        return self

    @property
    def staging(self) -> Path:
        """The staging directory, always set after validation."""
        assert self.staging_dir is not None
        return self.staging_dir
