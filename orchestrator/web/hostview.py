"""What the HTTP face may know of the host daemon: a protocol the daemon implements, so
that the face depends on it and never on the daemon's module."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from orchestrator.core.messages import Heartbeat, JobDetail, JobsQuery, JobSummary


@dataclass(frozen=True)
class MetricsSnapshot:
    """The numbers `/metrics` shows, read from the daemon at scrape time."""

    running_by_label: Mapping[str, int]
    max_concurrency: int
    cpus_used: int
    memory_mb_used: int
    broker_connected: bool
    finished_by_status: Mapping[str, int]
    results_published: int
    state_dir_bytes: int | None  # measured once a minute; None before the first time
    dlq_messages: int | None
    warm_vms: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (label, booting|ready|retiring)
    warm_failed: Mapping[str, int] = field(default_factory=dict)  # by label
    warm_taken: Mapping[str, int] = field(default_factory=dict)  # by label: jobs that took a pool VM
    warm_fallbacks: int = 0  # jobs whose pool VM could not take them (booted cold)
    warm_wanted: Mapping[str, int] = field(default_factory=dict)  # by label: the image's warm.ready


class HostView(Protocol):
    """What the HTTP layer may know about the daemon (read-only)."""

    @property
    def host_name(self) -> str: ...

    @property
    def broker_connected(self) -> bool: ...

    @property
    def broker_node(self) -> str | None: ...

    def not_ready_reasons(self) -> list[str]: ...

    def status(self) -> dict[str, object]: ...

    def job_running(self, job_id: str) -> bool: ...

    def console_path(self, job_id: str) -> Path: ...

    def metrics(self) -> MetricsSnapshot: ...

    async def jobs(self, query: JobsQuery) -> list[JobSummary]: ...

    async def job(self, job_id: str) -> JobDetail | None: ...

    async def set_draining(self, draining: bool) -> Heartbeat: ...
