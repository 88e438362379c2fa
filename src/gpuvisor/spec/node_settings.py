"""Parts of a Node's spec: its CPU and NVML devices, limits, worker and telemetry settings."""

from __future__ import annotations

from pydantic import Field, model_validator

from gpuvisor.spec.types import AutoFlag, Count, Duration, Size, SpecModel, field_error

__all__ = ["CpuDeviceConfig", "Limits", "NvmlConfig", "TelemetrySettings", "WorkerSettings"]


class CpuDeviceConfig(SpecModel):
    enabled: AutoFlag = "auto"
    """``auto``: serve on the CPU only when no GPU is found."""
    memory: Size | None = Field(default=None, gt=0)
    """Memory budget of the CPU device; None means half the host RAM."""
    threads: Count | None = Field(default=None, ge=1)
    """Intra-op threads; None means max(1, cpus // 2)."""
    concurrency: Count = Field(default=1, ge=1)
    quantum: Duration | None = Field(default=None, gt=0)
    lookahead: Duration | None = Field(default=None, ge=0)
    """How early the next batch is sent to its worker; None means 2 ms, 0 turns it off."""


class NvmlConfig(SpecModel):
    enabled: AutoFlag = "auto"
    concurrency: Count = Field(default=1, ge=1)
    """Batches granted at once on each GPU (1: the dispatcher alone decides who runs)."""
    quantum: Duration | None = Field(default=None, gt=0)
    """Longest non-critical batch on a GPU; None means 2 ms."""
    lookahead: Duration | None = Field(default=None, ge=0)
    """How early the next batch is sent to its worker; None means 1 ms, 0 turns it off."""


class Limits(SpecModel):
    max_body_size: Size = Field(default=64 * 2**20, gt=0)
    max_queued_per_slice: Count = Field(default=1024, ge=1)


class WorkerSettings(SpecModel):
    start_timeout: Duration = Field(default=120.0, gt=0)
    restart_backoff: Duration = Field(default=0.5, ge=0)
    restart_backoff_max: Duration = Field(default=30.0, ge=0)
    out_of_memory_retry: Duration = Field(default=30.0, gt=0)
    """First delay before a slice whose model ran out of memory while loading is loaded again
    (Failed in the meantime); doubles with each such failure in a row."""
    out_of_memory_retry_max: Duration = Field(default=600.0, gt=0)
    batch_timeout: Duration = Field(default=60.0, gt=0)
    """A batch that holds its device this long is taken as hung: its worker is stopped (its
    requests fail with 503) and restarted, so the other slices on the device go on."""
    batch_nice: Count = Field(default=10, ge=0, le=19)
    """Niceness added (to the node's own) for workers that serve only ``batch``-class slices
    (0: none), so the node and latency-sensitive workers get the host's CPU cores first."""

    @model_validator(mode="after")
    def _backoff_ordered(self) -> WorkerSettings:
        if self.restart_backoff_max < self.restart_backoff:
            raise field_error(
                "restartBackoffMax",
                f"must be at least restartBackoff ({self.restart_backoff:g}s), "
                f"got {self.restart_backoff_max:g}s",
            )
        if self.out_of_memory_retry_max < self.out_of_memory_retry:
            raise field_error(
                "outOfMemoryRetryMax",
                f"must be at least outOfMemoryRetry ({self.out_of_memory_retry:g}s), "
                f"got {self.out_of_memory_retry_max:g}s",
            )
        return self


class TelemetrySettings(SpecModel):
    sample_period: Duration = Field(default=1.0, ge=0.05, le=3600)
    """How often the sampler reads devices and workers (utilisation, memory, temperature, power)."""
