"""Warm pools: booted VMs waiting for jobs, for images whose map entry says `warm:`.

Per such image the pool keeps `warm.ready` VMs booted with the waiter
(`hypervisors.handoff`), each holding its slot, vCPUs and memory in the capacity ledger.
A job for that label whose resources are the image's defaults takes one (`take`): the
VM's reservation becomes the job's and the runner hands the job over; everything after
that is the cold path's. Each pool VM is owned by one task (`_keep`) from its reservation
until it is taken or destroyed, so nothing else ever destroys an untaken pool VM and
nothing is destroyed twice.

The pool refills in the background, at most `WARM_BOOTS_AT_ONCE` boots at a time across
all labels, and never while a job that took a pool VM has not run its first command yet
(at most `HAND_OFF_FIRST_S`): a restore copies hundreds of megabytes and a boot takes
the CPU, and a hand-off under way comes first. VMs older than `warm.max_age_s`, or built from an image that has changed
(its map entry or the installed file), are replaced. A VM that dies or never says it is
ready is replaced after a backoff that grows while boots keep failing, and each failure
is an `image.warm_failed` event. When a job of any label needs the room, idle pool VMs
are given up (`make_room`), and a pool that gave up VMs to another label waits
`YIELD_PAUSE_S` before refilling. While
the host drains, and at shutdown, idle pool VMs are destroyed.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import os
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hypervisors.base import BackendError, BackendName, Hypervisor, SeedFiles, VmSpec, VmState
from hypervisors.guest import build_meta_data
from hypervisors.handoff import HandOffError, waiter_user_data
from hypervisors.router import RouterHypervisor
from hypervisors.statedir import pool_vm_name
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import ImageEntry, ImageMap, Resources
from orchestrator.core.images import ImagePreparer, ImagePrepError, resolve_image_path
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import UtcDatetime, now_utc
from orchestrator.core.metrics import BootKind, DaemonMetrics
from orchestrator.host.capacity import CapacityLedger, Reservation

log = EventLogger("orchestrator.host.warmpool")

CHECK_S = 5.0  # ages and image changes are looked at this often, besides every change
YIELD_PAUSE_S = 30.0  # a pool that gave up VMs for other jobs waits this long to refill
HAND_OFF_FIRST_S = 10.0  # refills wait this long at most for a taken VM's first command
BACKOFF_FIRST_S = 5.0
BACKOFF_MAX_S = 600.0


class PoolVmState(str, enum.Enum):
    BOOTING = "booting"
    READY = "ready"  # said it waits for a job; its job port is open
    TAKEN = "taken"  # a job has it: the runner owns it from here
    RETIRING = "retiring"  # being destroyed: too old, image changed, room needed, drain


class WarmFailed(BaseModel):
    """`image.warm_failed.<label>` on `<prefix>.events`: a pool VM did not come up, or
    died while it waited."""

    model_config = ConfigDict(extra="ignore")

    kind: str = "image.warm_failed"
    host: str
    label: str
    vm: str
    reason: str
    failures_in_a_row: int
    retry_in_s: float
    at: UtcDatetime = Field(default_factory=now_utc)


@dataclass(frozen=True)
class ImageVersion:
    """What a pool VM was built from: the entry (pool settings aside) and the file."""

    entry: ImageEntry
    file: tuple[int, int, int, int] | None  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass
class PoolVm:
    name: str
    label: str
    spec: VmSpec
    backend: Hypervisor
    resources: Resources
    version: ImageVersion
    reservation: Reservation
    born: float = field(default_factory=time.monotonic)
    state: PoolVmState = PoolVmState.BOOTING
    ready_after_s: float | None = None  # boot → ready line
    taken: asyncio.Event = field(default_factory=asyncio.Event)
    began: asyncio.Event = field(default_factory=asyncio.Event)  # its job's first command ran, or the job ended
    retire: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    restore_from: Path | None = None  # started from this template instead of booting
    makes: Template | None = None  # booted to be saved as this template, never taken

    @property
    def idle(self) -> bool:
        return self.state in (PoolVmState.BOOTING, PoolVmState.READY) and not self.retire.is_set()


@dataclass
class Template:
    """A pool VM saved while it waits (`warm.snapshot`): pool VMs of this image version
    are restored from it. Its directory holds the saved memory and the disk they chain on."""

    label: str
    version: ImageVersion
    directory: Path
    ready: bool = False


def _version_key(version: ImageVersion) -> str:
    text = version.entry.model_dump_json() + repr(version.file)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _LabelHealth:
    failures_in_a_row: int = 0
    retry_at: float = 0.0
    paused_until: float = 0.0
    failed_total: int = 0
    taken_total: int = 0


def _backoff_s(failures_in_a_row: int) -> float:
    """A first failure is replaced at once (a VM killed from outside); failures in a
    row wait 5 s, 10 s, 20 s ... up to 10 min (a broken image must not boot in a loop)."""
    if failures_in_a_row <= 1:
        return 0.0
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (failures_in_a_row - 2))


def _file_identity(path: Path) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class WarmPools:
    def __init__(
        self,
        *,
        settings: DaemonSettings,
        image_map: ImageMap,
        router: RouterHypervisor,
        ledger: CapacityLedger,
        images: ImagePreparer,
        emit: Callable[[str, BaseModel], Awaitable[None]],
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self._settings = settings
        self._image_map = image_map
        self._router = router
        self._ledger = ledger
        self._images = images
        self._emit = emit
        self._metrics = metrics
        self._vms: dict[str, PoolVm] = {}
        self._templates: dict[str, Template] = {}  # by label: the current version's
        self._health: dict[str, _LabelHealth] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._making_room = 0  # refills wait while a job is being given room
        self._handing_off: dict[str, asyncio.Task[None]] = {}  # taken VMs whose job has not begun, by name

    # --- life ----------------------------------------------------------------------------
    async def start(self) -> None:
        # Templates of an earlier run describe images as they were then: made again when
        # needed. (A VM restored from one and still running keeps its disk open.)
        await asyncio.to_thread(_empty, self._settings.state.templates)
        self._ledger.listeners.append(self.poke)
        self._task = asyncio.create_task(self._loop(), name="warm-pools")

    def poke(self) -> None:
        self._wake.set()

    def update_map(self, image_map: ImageMap) -> None:
        """A reloaded map: pools of changed images are rebuilt, removed ones emptied."""
        self._image_map = image_map
        self.poke()

    async def close(self) -> None:
        """Stop refilling and destroy every pool VM no job has taken."""
        self._closed = True
        if self.poke in self._ledger.listeners:
            self._ledger.listeners.remove(self.poke)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        waits = list(self._handing_off.values())
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        await self._retire([vm for vm in self._vms.values() if vm.idle], "shutdown")
        await asyncio.gather(*(vm.task for vm in self._vms.values() if vm.task is not None), return_exceptions=True)
        for label in list(self._templates):
            await self._drop_template(label)

    # --- what jobs ask ---------------------------------------------------------------------
    def take(self, label: str, resources: Resources, job_id: str) -> tuple[PoolVm, Reservation] | None:
        """A ready pool VM of `label` with exactly `resources`, now the job's (with the
        job's reservation), or None: the job boots cold."""
        for vm in sorted(self._vms.values(), key=lambda vm: vm.born):
            if vm.label == label and vm.state is PoolVmState.READY and vm.idle and vm.resources == resources:
                vm.state = PoolVmState.TAKEN
                vm.taken.set()
                del self._vms[vm.name]  # the runner's from here; its task lets go of it
                self._handing_off[vm.name] = asyncio.create_task(self._hand_off_first(vm), name=f"hand-off-{vm.name}")
                reservation = self._ledger.take_warm(vm.reservation, job_id)
                self._health.setdefault(label, _LabelHealth()).taken_total += 1
                log.info(
                    "pool.vm_taken", job_id=job_id, label=label, vm=vm.name, age_s=round(time.monotonic() - vm.born, 1)
                )
                return vm, reservation
        return None

    async def _hand_off_first(self, vm: PoolVm) -> None:
        """Hold refills until the job that took `vm` runs its first command."""
        try:
            await asyncio.wait_for(vm.began.wait(), HAND_OFF_FIRST_S)
        except TimeoutError:
            pass
        finally:
            if self._handing_off.get(vm.name) is asyncio.current_task():  # not a later take's
                del self._handing_off[vm.name]
            self.poke()

    def give_back(self, vm: PoolVm, job_reservation: Reservation) -> None:
        """Undo `take` (the job was known here already): the VM is the pool's again."""
        waiting = self._handing_off.pop(vm.name, None)
        if waiting is not None:
            waiting.cancel()
        vm.reservation = self._ledger.return_warm(job_reservation, vm.name)
        vm.state = PoolVmState.READY
        vm.taken.clear()
        self._vms[vm.name] = vm
        self._health[vm.label].taken_total -= 1
        vm.task = asyncio.create_task(self._watch_ready(vm), name=f"pool-{vm.name}")

    async def make_room(self, label: str, cpus: int, memory_mb: int, *, claim: Reservation | None = None) -> bool:
        """Give up idle pool VMs until a job of `label` with this size has room (in place
        of its delivery's `claim`, when it has one); False (nothing given up) when even
        that would not make room."""
        idle = [vm for vm in self._vms.values() if vm.idle]
        # Other labels' first, then booting ones (least work lost), then the oldest.
        idle.sort(key=lambda vm: (vm.label == label, vm.state is PoolVmState.READY, vm.born))
        own = [claim] if claim is not None else []
        chosen: list[PoolVm] = []
        for vm in idle:
            if self._ledger.room_without(label, cpus, memory_mb, own + [c.reservation for c in chosen]):
                break
            chosen.append(vm)
        if not chosen or not self._ledger.room_without(label, cpus, memory_mb, own + [c.reservation for c in chosen]):
            return False
        self._making_room += 1
        try:
            pause_until = time.monotonic() + YIELD_PAUSE_S
            for vm in chosen:
                if vm.label != label:  # its own label's jobs want the pool back soon
                    self._health.setdefault(vm.label, _LabelHealth()).paused_until = pause_until
            await self._retire(chosen, f"room for a job of {label}")
        finally:
            self._making_room -= 1
        return True

    # --- what /status, heartbeats and metrics show -------------------------------------------
    def counts(self) -> dict[str, Counter[str]]:
        """Pool VMs by label and state (`booting`, `ready`, `retiring`)."""
        counts: dict[str, Counter[str]] = {}
        for vm in self._vms.values():
            counts.setdefault(vm.label, Counter())[vm.state.value] += 1
        return counts

    def status(self) -> dict[str, dict[str, object]]:
        counts = self.counts()
        now = time.monotonic()
        shown: dict[str, dict[str, object]] = {}
        for label, image in sorted(self._image_map.images.items()):
            health = self._health.get(label, _LabelHealth())
            if image.warm is None and label not in counts:
                continue
            shown[label] = {
                "wanted": image.warm.ready if image.warm is not None else 0,
                "ready": counts.get(label, Counter())["ready"],
                "booting": counts.get(label, Counter())["booting"],
                "failed_total": health.failed_total,
                "taken_total": health.taken_total,
                "failures_in_a_row": health.failures_in_a_row,
                "retry_in_s": round(max(0.0, health.retry_at - now), 1) or None,
            }
        return shown

    def wanted(self) -> dict[str, int]:
        """Ready VMs each warm image asks for (its `warm.ready`), by label."""
        return {label: image.warm.ready for label, image in self._image_map.images.items() if image.warm is not None}

    def failed_total(self) -> dict[str, int]:
        return {label: h.failed_total for label, h in self._health.items() if h.failed_total}

    def taken_total(self) -> dict[str, int]:
        return {label: h.taken_total for label, h in self._health.items() if h.taken_total}

    # --- keeping the pools full ------------------------------------------------------------
    async def _loop(self) -> None:
        while not self._closed:
            self._wake.clear()
            try:
                await self._tend()
            except Exception as exc:  # one bad pass must not end the pools
                log.error("pool.tend_failed", error=repr(exc), exc_info=True)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=CHECK_S)
            except TimeoutError:
                pass

    async def _tend(self) -> None:
        if self._closed:
            return
        stale: list[tuple[PoolVm, str]] = []
        now = time.monotonic()
        versions = {
            label: await self._version(label, image) for label, image in self._image_map.images.items() if image.warm
        }
        for vm in self._vms.values():
            if not vm.idle:
                continue
            image = self._image_map.images.get(vm.label)
            if self._ledger.draining:
                stale.append((vm, "the host is draining"))
            elif image is None or image.warm is None:
                stale.append((vm, "its image no longer asks for a warm pool"))
            elif versions.get(vm.label) != vm.version:
                stale.append((vm, "its image changed"))
            elif now - vm.born > image.warm.max_age_s:
                stale.append((vm, f"older than max_age_s {image.warm.max_age_s}"))
        for vm, why in stale:
            self._retire_soon(vm, why)
        if self._ledger.draining or self._making_room or self._handing_off:
            return
        for label, image in sorted(self._image_map.images.items()):
            version = versions.get(label)
            if image.warm is not None and version is not None:
                await self._refill(label, image, version, now)
        for label in [
            label
            for label in self._templates
            if self._image_map.images.get(label) is None or not (self._image_map.images[label].warm or None)
        ]:
            await self._drop_template(label)

    async def _refill(self, label: str, image: ImageEntry, version: ImageVersion, now: float) -> None:
        assert image.warm is not None
        health = self._health.setdefault(label, _LabelHealth())
        if now < health.retry_at or now < health.paused_until:
            return
        template = self._templates.get(label)
        if template is not None and (template.version != version or not image.warm.snapshot):
            await self._drop_template(label)
            template = None
        if image.warm.snapshot and template is None:
            directory = self._settings.state.templates / f"{label}-{_version_key(version)}"
            self._boot_vms(label, image, version, 1, makes=Template(label, version, directory))
            return
        if template is not None and not template.ready:
            return  # being made
        have = sum(1 for vm in self._vms.values() if vm.label == label and vm.idle)
        self._boot_vms(
            label, image, version, image.warm.ready - have, restore_from=template.directory if template else None
        )

    def _boot_vms(
        self,
        label: str,
        image: ImageEntry,
        version: ImageVersion,
        count: int,
        *,
        restore_from: Path | None = None,
        makes: Template | None = None,
    ) -> None:
        resources = self._image_map.default_resources(label)
        for _ in range(count):
            if (
                sum(1 for vm in self._vms.values() if vm.state is PoolVmState.BOOTING)
                >= self._settings.warm_boots_at_once
            ):
                return
            name = pool_vm_name()
            reservation = self._ledger.reserve_warm(name, label, resources.cpus, resources.memory_mb)
            if reservation is None:
                return  # no room now: a release pokes us
            backend = self._router.backend_for(image.backend)
            try:
                spec = self._spec(name, label, image, resources)
            except ImagePrepError as exc:  # the image's path moved outside IMAGE_DIR since
                self._ledger.release(reservation)
                log.error("pool.image_unusable", label=label, error=str(exc))
                return
            vm = PoolVm(
                name, label, spec, backend, resources, version, reservation, restore_from=restore_from, makes=makes
            )
            self._vms[name] = vm
            if makes is not None:
                self._templates[label] = makes
            vm.task = asyncio.create_task(self._keep(vm), name=f"pool-{name}")
            log.info(
                "pool.vm_booting",
                label=label,
                vm=name,
                backend=backend.name.value,
                restoring=restore_from is not None,
                template=makes is not None,
            )

    async def _version(self, label: str, image: ImageEntry) -> ImageVersion | None:
        """The image a new pool VM of `label` boots from, or None when it is not ready."""
        if (image.backend or self._settings.backend) is BackendName.NOOP:
            return ImageVersion(image.without_warm(), None)
        if not self._images.state(label).ready:
            return None
        try:
            path = resolve_image_path(image, image_dir=self._images.image_dir)
            return ImageVersion(image.without_warm(), await asyncio.to_thread(_file_identity, path))
        except (ImagePrepError, OSError):
            return None

    def _spec(self, name: str, label: str, image: ImageEntry, resources: Resources) -> VmSpec:
        """A pool VM: the image's default size, the waiter as user-data, a job port."""
        image_path = image.local_path
        if (image.backend or self._settings.backend) is not BackendName.NOOP:
            # The file as resolved now: a symlink swapped later changes the version, not this VM.
            image_path = resolve_image_path(image, image_dir=self._images.image_dir)
        return VmSpec(
            name=name,
            job_id="",
            image_path=image_path,
            image_format=image.format,
            cpus=resources.cpus,
            memory_mb=resources.memory_mb,
            disk_gb=resources.disk_gb,
            console_path=self._settings.state.console(name),
            seed=SeedFiles(waiter_user_data(vm_name=name), build_meta_data(job_id=name, hostname=name[:63])),
            direct_boot=image.direct_boot(),
            job_channel=self._settings.state.channel(name),
        )

    # --- one pool VM's life ------------------------------------------------------------------
    async def _keep(self, vm: PoolVm) -> None:
        """Boot the VM, wait for its ready line, then watch it until a job takes it. Any
        end but a job taking it destroys it here (and nowhere else)."""
        taken, failure = False, None
        try:
            failure = await self._boot(vm)
            if failure is None and not vm.retire.is_set() and vm.makes is None:
                taken, failure = await self._wait_taken(vm)
        except Exception as exc:
            failure = f"orchestrator error: {exc!r}"
        finally:
            if not taken:
                await self._dispose(vm, failure if not vm.retire.is_set() else None)

    async def _boot(self, vm: PoolVm) -> str | None:
        """None once the VM said it is ready (or when it was retired meanwhile), else why not."""
        started = time.monotonic()
        image = self._image_map.images.get(vm.label)
        timeout_s = (image.boot_timeout_s if image is not None else None) or self._settings.boot_timeout_s
        try:
            # Not interrupted: a VM half made by a cancelled call could outlive `destroy`.
            if vm.restore_from is not None:
                await vm.backend.restore(vm.spec, vm.restore_from)
            else:
                await vm.backend.prepare(vm.spec)
                if vm.retire.is_set():
                    return None
                await vm.backend.start(vm.spec)
            if vm.makes is not None:
                await vm.backend.save_template(vm.spec, vm.makes.directory, timeout_s=timeout_s)
                await self._template_made(vm.makes, time.monotonic() - started)
                return None
        except BackendError as exc:
            current = self._templates.get(vm.label)
            if current is not None and (current is vm.makes or current.directory == vm.restore_from):
                await self._drop_template(vm.label)  # made again after the backoff
            return f"did not start: {exc}"
        ready = asyncio.create_task(vm.backend.wait_ready(vm.spec, timeout_s=timeout_s))
        retire = asyncio.create_task(vm.retire.wait())
        try:
            await asyncio.wait({ready, retire}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (ready, retire):
                task.cancel()
            await asyncio.gather(ready, retire, return_exceptions=True)
        if vm.retire.is_set():
            return None
        try:
            ready.result()
        except (HandOffError, BackendError) as exc:
            return f"never said it was ready: {exc}"
        vm.state = PoolVmState.READY
        vm.ready_after_s = round(time.monotonic() - started, 3)
        self._health.setdefault(vm.label, _LabelHealth()).failures_in_a_row = 0
        log.info(
            "pool.vm_ready", label=vm.label, vm=vm.name, boot_s=vm.ready_after_s, restored=vm.restore_from is not None
        )
        if self._metrics is not None:
            kind = BootKind.RESTORED if vm.restore_from is not None else BootKind.POOL
            self._metrics.vm_booted(label=vm.label, kind=kind, seconds=vm.ready_after_s)
        self.poke()
        return None

    async def _wait_taken(self, vm: PoolVm) -> tuple[bool, str | None]:
        """Until a job takes the VM (True), it is retired, or it stops (why)."""
        stopped = asyncio.create_task(vm.backend.wait_stopped(vm.spec))
        taken = asyncio.create_task(vm.taken.wait())
        retire = asyncio.create_task(vm.retire.wait())
        try:
            await asyncio.wait({stopped, taken, retire}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopped, taken, retire):
                task.cancel()
            await asyncio.gather(stopped, taken, retire, return_exceptions=True)
        if taken.done() and not taken.cancelled():
            return True, None
        if vm.retire.is_set():
            return False, None
        state = stopped.result() if not stopped.cancelled() and stopped.exception() is None else VmState.GONE
        return False, f"it {'vanished' if state is VmState.GONE else 'stopped'} while it waited for a job"

    async def _watch_ready(self, vm: PoolVm) -> None:
        """A VM given back after `take`: watched again as a ready one."""
        taken, failure = False, None
        try:
            taken, failure = await self._wait_taken(vm)
        finally:
            if not taken:
                await self._dispose(vm, failure if not vm.retire.is_set() else None)

    async def _template_made(self, template: Template, took_s: float) -> None:
        if self._templates.get(template.label) is not template:  # its image changed meanwhile
            await asyncio.to_thread(shutil.rmtree, template.directory, True)
            return
        template.ready = True
        self._health.setdefault(template.label, _LabelHealth()).failures_in_a_row = 0
        log.info(
            "pool.template_saved",
            label=template.label,
            directory=str(template.directory),
            boot_and_save_s=round(took_s, 3),
        )
        self.poke()

    async def _drop_template(self, label: str) -> None:
        """Forget `label`'s template; its files go once made (a VM still making it finds
        itself forgotten and removes them). Running VMs restored from it keep its disk open."""
        template = self._templates.pop(label, None)
        if template is not None and template.ready:
            await asyncio.to_thread(shutil.rmtree, template.directory, True)
            log.info("pool.template_removed", label=label, directory=str(template.directory))

    def _retire_soon(self, vm: PoolVm, why: str) -> None:
        if vm.idle:
            log.info("pool.vm_retiring", label=vm.label, vm=vm.name, reason=why)
            vm.retire.set()

    async def _retire(self, vms: list[PoolVm], why: str) -> None:
        for vm in vms:
            self._retire_soon(vm, why)
        await asyncio.gather(*(vm.task for vm in vms if vm.task is not None), return_exceptions=True)

    async def _dispose(self, vm: PoolVm, failure: str | None) -> None:
        vm.state = PoolVmState.RETIRING
        # The backoff first: the pool must not boot a replacement while this one goes.
        event = self._note_failure(vm, failure) if failure is not None else None
        try:
            await vm.backend.destroy(vm.spec)
            await asyncio.to_thread(vm.spec.console_path.unlink, missing_ok=True)
        except Exception as exc:
            # Its reservation goes with it: the VM is ours by its tag, and the next start's
            # reconciliation destroys it.
            log.error("pool.vm_destroy_failed", label=vm.label, vm=vm.name, error=str(exc))
        self._vms.pop(vm.name, None)
        self._ledger.release(vm.reservation)
        if event is not None:
            await self._emit(f"image.warm_failed.{vm.label}", event)
        self.poke()

    def _note_failure(self, vm: PoolVm, reason: str) -> WarmFailed:
        health = self._health.setdefault(vm.label, _LabelHealth())
        health.failures_in_a_row += 1
        health.failed_total += 1
        retry_in_s = _backoff_s(health.failures_in_a_row)
        health.retry_at = time.monotonic() + retry_in_s
        log.warning(
            "pool.vm_failed",
            label=vm.label,
            vm=vm.name,
            reason=reason,
            failures_in_a_row=health.failures_in_a_row,
            retry_in_s=retry_in_s,
        )
        return WarmFailed(
            host=self._settings.host_name,
            label=vm.label,
            vm=vm.name,
            reason=reason,
            failures_in_a_row=health.failures_in_a_row,
            retry_in_s=retry_in_s,
        )


def _empty(directory: Path) -> None:
    if directory.is_dir():
        for entry in directory.iterdir():
            shutil.rmtree(entry, ignore_errors=True)
