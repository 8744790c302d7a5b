"""The contract every hypervisor backend implements.

A backend owns the whole life of one job VM: it turns a `VmSpec` into a VM (`prepare`),
boots it (`start`), reports when it has stopped (`wait_stopped`), stops it gracefully or
not (`shutdown`, `destroy`), and finds the VMs it made earlier (`list_ours`), including
after a daemon restart, so leaked VMs can always be collected. A new backend is one new
module implementing `Hypervisor`.
"""

from __future__ import annotations

import enum
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable


class BackendName(str, enum.Enum):
    LIBVIRT = "libvirt"
    ZONES = "zones"
    NOOP = "noop"


class VmState(str, enum.Enum):
    DEFINED = "defined"
    RUNNING = "running"
    STOPPED = "stopped"
    GONE = "gone"


class ImageFormat(str, enum.Enum):
    QCOW2 = "qcow2"
    RAW = "raw"


class BackendError(Exception):
    """A backend could not do what was asked; the message says what and why."""


@dataclass(frozen=True)
class SeedFiles:
    """The NoCloud seed contents (the backend decides how to attach them)."""

    user_data: bytes
    meta_data: bytes
    network_config: bytes | None = None


@dataclass(frozen=True)
class DirectBoot:
    kernel: Path
    initrd: Path | None = None
    cmdline: str | None = None


@dataclass(frozen=True)
class VmSpec:
    """Everything a backend needs to build one job VM."""

    name: str
    job_id: str
    image_path: Path | None
    image_format: ImageFormat | None
    cpus: int
    memory_mb: int
    disk_gb: int | None
    console_path: Path
    seed: SeedFiles | None = None
    direct_boot: DirectBoot | None = None
    # The job's env and result nonce: the noop backend reads them to simulate a guest;
    # real backends ignore them (the guest learns both from the seed).
    env: dict[str, str] = field(default_factory=dict)
    nonce: str = ""
    # A pool VM: booted with the waiter (hypervisors.handoff) and a job port on this
    # unix socket; the job comes later, through `hand_over`.
    job_channel: Path | None = None


@dataclass(frozen=True)
class VmInfo:
    """A VM found by `list_ours`: enough to adopt it or clean it up."""

    name: str
    job_id: str
    backend: BackendName
    state: VmState
    console_path: Path | None = None
    pool: bool = False  # a warm pool VM (no job of its own until one takes it)


@runtime_checkable
class Hypervisor(Protocol):
    """Async VM lifecycle. Every method may be called again after a failure; `destroy`
    of a VM that is already gone is not an error."""

    name: BackendName

    async def prepare(self, spec: VmSpec) -> None:
        """Create the VM's resources (disk overlay, seed, definition); do not boot."""

    async def start(self, spec: VmSpec) -> None:
        """Boot a prepared VM. Raises `BackendError` when it does not come up."""

    async def wait_ready(self, spec: VmSpec, *, timeout_s: float) -> None:
        """Return once a pool VM (started with `job_channel`) says it waits for a job, and
        keep its job port open. Raises `hypervisors.handoff.HandOffError`."""

    async def hand_over(self, spec: VmSpec, job: VmSpec, *, ready_timeout_s: float) -> None:
        """Give a pool VM its job (`job`: its user-data, nonce, env and console); from
        then on it runs like a cold job VM. Raises `hypervisors.handoff.HandOffError`."""

    async def save_template(self, spec: VmSpec, template: Path, *, timeout_s: float) -> None:
        """Save a started pool VM, once it waits for its job, as a template in the
        directory `template` (memory and disk); the VM is gone afterwards."""

    async def restore(self, spec: VmSpec, template: Path) -> None:
        """Start the pool VM `spec` from a template instead of booting it (then
        `wait_ready` as for a booted one). Raises `BackendError`."""

    async def wait_stopped(self, spec: VmSpec) -> VmState:
        """Return once the VM has powered off (or is gone)."""

    async def shutdown(self, spec: VmSpec, *, timeout_s: float) -> None:
        """Ask the guest to power off; destroy it when it has not within `timeout_s`."""

    async def destroy(self, spec: VmSpec) -> None:
        """Stop the VM at once and delete everything `prepare` made except the console log."""

    async def list_ours(self) -> list[VmInfo]:
        """VMs this orchestrator made (by its tag), whatever their state."""

    async def leftovers(self, live_vms: AbstractSet[str]) -> list[str]:
        """Remove what this backend made for VMs that are gone and not in `live_vms` (the
        names of the live jobs' VMs): files, clones, job ports. Say what was removed;
        never touch anything not named or tagged as ours."""

    async def close(self) -> None:
        """Release connections; VMs keep running."""
