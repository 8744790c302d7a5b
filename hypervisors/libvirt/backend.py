"""The libvirt backend: qcow2 overlay + NoCloud seed + persistent domain per job.

Domains are persistent (define, then start) rather than transient: a VM that stopped
while the daemon was down is still defined, with our metadata tag, so the daemon can
collect it after a restart; `destroy` undefines it. Nothing without our tag is touched.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Set as AbstractSet
from dataclasses import replace
from pathlib import Path

import libvirt

from hypervisors.base import BackendError, BackendName, ImageFormat, VmInfo, VmSpec, VmState
from hypervisors.guest import file_contains
from hypervisors.handoff import HandOffError, JobPort, job_payload
from hypervisors.libvirt.connection import LibvirtConnection
from hypervisors.libvirt.domain import DomainFiles, build_domain_xml, read_job_tag, rewrite_for_restore
from hypervisors.libvirt.overlay import create_overlay
from hypervisors.libvirt.saveimage import SaveImageError, read_header, write_with_xml
from hypervisors.seed import write_seed_iso
from hypervisors.statedir import StateDir, open_private, vm_of_file

STATE_POLL_S = 5.0  # safety net under lifecycle events
# A template's files, in its directory (`warmpool` names the directory per image version).
TEMPLATE_MEMORY = "memory.save"
TEMPLATE_DISK = "disk.qcow2"
TEMPLATE_SEED = "seed.iso"
TEMPLATE_SETTLE_S = 0.5
WAITING_LINE = b"is waiting for a job"  # what the waiter prints before it says ready


async def _wait_for_line(path: Path, text: bytes, *, timeout_s: float) -> None:
    """Until the console file holds `text` (polled: the file is QEMU's)."""
    async with asyncio.timeout(timeout_s):
        # Polled: QEMU writes the file, there is no event to wait on.
        while not await asyncio.to_thread(file_contains, path, text):  # noqa: ASYNC110
            await asyncio.sleep(0.1)


def _keep_as_template(files: DomainFiles, template: Path) -> None:
    """The saved VM's disk and seed become the template's, read-only."""
    for source, name in ((files.overlay, TEMPLATE_DISK), (files.seed, TEMPLATE_SEED)):
        if source is not None:
            target = template / name
            os.replace(source, target)
            os.chmod(target, 0o440)


def _kvm_usable() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _not_found(exc: libvirt.libvirtError) -> bool:
    return exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN


def _create_private(path: Path) -> None:
    with open_private(path, append=True):
        pass


def _vm_state(code: int) -> VmState:
    """A libvirt domain state as ours: shut off or crashed is stopped, the rest runs."""
    return VmState.STOPPED if code in (libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED) else VmState.RUNNING


class LibvirtHypervisor:
    name = BackendName.LIBVIRT

    def __init__(self, *, state_dir: Path, orchestrator_id: str, network: str | None, domain_type: str) -> None:
        self._paths = StateDir(state_dir)
        self._orchestrator_id = orchestrator_id
        self._network = network
        self.domain_type = domain_type
        self._stopped: dict[str, asyncio.Event] = {}
        self._ports: dict[str, JobPort] = {}  # pool VMs that said they are ready
        # Restored VMs: (the template's MAC, their own) when they have a NIC, else None.
        self._restored: dict[str, tuple[str, str] | None] = {}
        self.connection: LibvirtConnection

    @classmethod
    async def connect(
        cls, *, uri: str, network: str | None, domain_type: str, state_dir: Path, orchestrator_id: str
    ) -> LibvirtHypervisor:
        backend = cls(state_dir=state_dir, orchestrator_id=orchestrator_id, network=network, domain_type=domain_type)
        backend.connection = LibvirtConnection(uri, backend._on_lifecycle)
        await backend.connection.open()
        if domain_type == "auto":
            backend.domain_type = await backend._detect_domain_type()
        if network is not None:
            await backend.ensure_network(network)
        return backend

    async def _detect_domain_type(self) -> str:
        capabilities = await self.connection.call(lambda c: c.getCapabilities())
        return "kvm" if "type='kvm'" in capabilities and _kvm_usable() else "qemu"

    async def ensure_network(self, name: str) -> None:
        """Make the network active and autostarted; a clear error when it does not exist."""

        def ensure(conn: libvirt.virConnect) -> None:
            try:
                network = conn.networkLookupByName(name)
            except libvirt.libvirtError:
                raise BackendError(
                    f"libvirt network {name!r} does not exist (define it with virsh net-define, "
                    "or set LIBVIRT_NETWORK=none for VMs without a NIC)"
                ) from None
            if not network.isActive():
                network.create()
            if not network.autostart():
                network.setAutostart(1)

        await self.connection.call(ensure)

    # --- paths -------------------------------------------------------------------------
    def files_for(self, spec: VmSpec) -> DomainFiles:
        return DomainFiles(
            overlay=self._paths.overlay(spec.name),
            # Named whether or not this spec carries the seed: `destroy` of a VM known
            # only by name (a pool VM taken back after a restart) removes it too.
            seed=self._paths.seed(spec.name),
            channel=spec.job_channel,
            console=spec.console_path,
        )

    # --- events ------------------------------------------------------------------------
    def _on_lifecycle(self, name: str, event: int, _detail: int) -> None:
        if event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            waiter = self._stopped.get(name)
            if waiter is not None:
                waiter.set()

    # --- lifecycle ---------------------------------------------------------------------
    async def prepare(self, spec: VmSpec) -> None:
        if spec.image_path is None or spec.image_format is None:
            raise BackendError(f"VM {spec.name}: the image map must give local_path and format for libvirt images")
        files = self.files_for(spec)
        try:
            await create_overlay(spec.image_path, spec.image_format, files.overlay, spec.disk_gb)
            if spec.seed is not None:
                assert files.seed is not None  # a spec with a seed has a seed file
                await asyncio.to_thread(write_seed_iso, spec.seed, files.seed)
            spec.console_path.parent.mkdir(parents=True, exist_ok=True)
            if spec.job_channel is not None:
                spec.job_channel.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_create_private, spec.console_path)  # before QEMU makes it 0644
            xml = build_domain_xml(
                spec,
                files if spec.seed is not None else replace(files, seed=None),
                domain_type=self.domain_type,
                orchestrator_id=self._orchestrator_id,
                network=self._network,
            )
            await self.connection.call(lambda c: c.defineXML(xml))
        except libvirt.libvirtError as exc:
            await self._delete_files(files)
            raise BackendError(f"VM {spec.name}: libvirt refused the domain: {exc.get_error_message()}") from None
        except (BackendError, OSError) as exc:
            await self._delete_files(files)
            raise BackendError(f"VM {spec.name}: {exc}") from None

    async def wait_ready(self, spec: VmSpec, *, timeout_s: float) -> None:
        """Wait for a pool VM's ready line on its job port, and keep the port open."""
        if spec.job_channel is None:
            raise HandOffError(f"VM {spec.name} has no job port")
        port = await JobPort.open_when_ready(spec.job_channel, timeout_s=timeout_s)
        stale = self._ports.pop(spec.name, None)
        if stale is not None:
            stale.close()
        self._ports[spec.name] = port

    async def hand_over(self, spec: VmSpec, job: VmSpec, *, ready_timeout_s: float) -> None:
        """Give a pool VM (booted with the waiter) its job: `job`'s user-data, run as a
        cold VM would run it. Raises `HandOffError`."""
        if spec.job_channel is None or job.seed is None:
            raise HandOffError(f"VM {spec.name} has no job port, or the job no user-data")
        if spec.name not in self._ports:
            await self.wait_ready(spec, timeout_s=ready_timeout_s)
        restored = spec.name in self._restored
        payload = job_payload(job.seed.user_data, restored=restored, mac_change=self._restored.pop(spec.name, None))
        await self._ports.pop(spec.name).send(payload)

    # --- snapshot templates (warm pools with `snapshot: true`) ---------------------------
    async def save_template(self, spec: VmSpec, template: Path, *, timeout_s: float) -> None:
        """Turn a started pool VM into a template: once its waiter has printed that it is
        waiting (and blocks saying so on its job port, which no host has connected to),
        save its memory to `template/memory.save` and keep its disk and seed there; the
        VM is gone afterwards. Raises `BackendError`."""
        try:
            await _wait_for_line(spec.console_path, WAITING_LINE, timeout_s=timeout_s)
            await asyncio.sleep(TEMPLATE_SETTLE_S)  # from its echo to its blocking write
            await asyncio.to_thread(template.mkdir, parents=True, exist_ok=True)
            files = self.files_for(spec)
            memory = template / TEMPLATE_MEMORY

            def save(conn: libvirt.virConnect) -> None:
                domain = conn.lookupByName(spec.name)
                domain.save(str(memory))  # the domain stops; its definition stays
                domain.undefine()

            await self.connection.call(save)
            await asyncio.to_thread(_keep_as_template, files, template)
        except libvirt.libvirtError as exc:
            raise BackendError(f"VM {spec.name}: could not be saved as a template: {exc.get_error_message()}") from None
        except (OSError, TimeoutError) as exc:
            raise BackendError(f"VM {spec.name}: could not be saved as a template: {exc or 'timed out'}") from None
        finally:
            await self.destroy(spec)

    async def restore(self, spec: VmSpec, template: Path) -> None:
        """Start the pool VM `spec` from `template` (see `save_template`) instead of
        booting it: its own overlay on the template's disk, its own name, UUID, MAC,
        console and job port, in a re-headed copy of the saved memory (`saveimage`).
        Raises `BackendError`."""
        files = self.files_for(spec)
        copy = files.overlay.with_suffix(".save")
        try:
            await create_overlay(template / TEMPLATE_DISK, ImageFormat.QCOW2, files.overlay, None)
            spec.console_path.parent.mkdir(parents=True, exist_ok=True)
            if spec.job_channel is not None:
                spec.job_channel.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(_create_private, spec.console_path)
            header = await asyncio.to_thread(read_header, template / TEMPLATE_MEMORY)
            restored = rewrite_for_restore(
                header.xml,
                name=spec.name,
                files=replace(files, seed=None),
                template_seed=template / TEMPLATE_SEED,
                orchestrator_id=self._orchestrator_id,
            )
            await asyncio.to_thread(write_with_xml, template / TEMPLATE_MEMORY, copy, restored.xml)
            self._stopped[spec.name] = asyncio.Event()

            def restore(conn: libvirt.virConnect) -> None:
                conn.restore(str(copy))
                # Persistent, like every VM of ours: one that stops while the daemon is
                # down stays listed, so its result is collected after a restart.
                conn.defineXML(conn.lookupByName(spec.name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))

            await self.connection.call(restore)
            self._restored[spec.name] = restored.mac_change
        except (libvirt.libvirtError, SaveImageError, ValueError, OSError, BackendError) as exc:
            detail = exc.get_error_message() if isinstance(exc, libvirt.libvirtError) else str(exc)
            await self.destroy(spec)
            raise BackendError(f"VM {spec.name} could not be restored from {template}: {detail}") from None
        finally:
            await asyncio.to_thread(copy.unlink, missing_ok=True)

    async def start(self, spec: VmSpec) -> None:
        self._stopped[spec.name] = asyncio.Event()
        try:
            await self.connection.call(lambda c: c.lookupByName(spec.name).create())
        except libvirt.libvirtError as exc:
            raise BackendError(f"VM {spec.name} did not start: {exc.get_error_message()}") from None

    async def _state(self, name: str) -> VmState:
        def state(conn: libvirt.virConnect) -> VmState:
            try:
                return _vm_state(conn.lookupByName(name).state()[0])
            except libvirt.libvirtError as exc:
                if _not_found(exc):
                    return VmState.GONE
                raise

        return await self.connection.call(state)

    async def wait_stopped(self, spec: VmSpec) -> VmState:
        waiter = self._stopped.setdefault(spec.name, asyncio.Event())
        while True:
            # The state check runs after the waiter exists, so no stop event is missed;
            # the poll also covers events lost while libvirtd restarted.
            state = await self._state(spec.name)
            if state in (VmState.STOPPED, VmState.GONE):
                return state
            try:
                await asyncio.wait_for(waiter.wait(), timeout=STATE_POLL_S)
            except TimeoutError:
                continue
            waiter.clear()

    async def shutdown(self, spec: VmSpec, *, timeout_s: float) -> None:
        def press_power_button(conn: libvirt.virConnect) -> None:
            try:
                conn.lookupByName(spec.name).shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as exc:
                if not _not_found(exc) and exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise

        try:
            await self.connection.call(press_power_button)
            await asyncio.wait_for(self.wait_stopped(spec), timeout=timeout_s)
        except (TimeoutError, libvirt.libvirtError):
            pass
        await self.destroy(spec)

    async def destroy(self, spec: VmSpec) -> None:
        self._restored.pop(spec.name, None)
        port = self._ports.pop(spec.name, None)
        if port is not None:
            port.close()
        await self._destroy_domain(spec.name)
        self._stopped.pop(spec.name, None)
        await self._delete_files(self.files_for(spec))

    async def _destroy_domain(self, name: str) -> None:
        def destroy(conn: libvirt.virConnect) -> None:
            try:
                domain = conn.lookupByName(name)
            except libvirt.libvirtError as exc:
                if _not_found(exc):
                    return
                raise
            try:
                if domain.isActive():
                    domain.destroy()
            except libvirt.libvirtError as exc:
                if exc.get_error_code() != libvirt.VIR_ERR_OPERATION_INVALID:
                    raise
            try:
                domain.undefine()
            except libvirt.libvirtError as exc:
                if not _not_found(exc):
                    raise

        await self.connection.call(destroy)

    async def _delete_files(self, files: DomainFiles) -> None:
        def delete() -> None:
            for path in (files.overlay, files.seed, files.channel):
                if path is not None:
                    path.unlink(missing_ok=True)
                    path.with_name(path.name + ".partial").unlink(missing_ok=True)

        await asyncio.to_thread(delete)

    async def list_ours(self) -> list[VmInfo]:
        orchestrator_id = self._orchestrator_id

        def scan(conn: libvirt.virConnect) -> list[VmInfo]:
            found = []
            for domain in conn.listAllDomains(0):
                try:
                    tag = read_job_tag(domain.XMLDesc(0))
                    if tag is None or tag.orchestrator_id != orchestrator_id:
                        continue
                    code = domain.state()[0]
                except libvirt.libvirtError:
                    continue  # vanished while we looked
                found.append(
                    VmInfo(domain.name(), tag.job_id, BackendName.LIBVIRT, _vm_state(code), tag.console, tag.pool)
                )
            return found

        return await self.connection.call(scan)

    async def leftovers(self, live_vms: AbstractSet[str]) -> list[str]:
        """Overlays and seeds named `job-<uuid>.*` or `pool-<uuid>.*` (and their
        `.partial`s), and job ports, of VMs that are not live; an operator's own files in
        these directories are never touched."""
        paths = self._paths
        live_ports = {paths.channel(vm).name for vm in live_vms}

        def delete() -> list[str]:
            removed = []
            for directory in (paths.overlays, paths.seeds):
                if not directory.is_dir():
                    continue
                for path in directory.iterdir():
                    vm = vm_of_file(path)
                    if vm is not None and vm not in live_vms and path.suffix in (".qcow2", ".iso", ".partial"):
                        path.unlink(missing_ok=True)
                        removed.append(str(path))
            if paths.channels.is_dir():
                for path in paths.channels.iterdir():
                    if paths.channel_vm_suffix(path) is not None and path.name not in live_ports and path.is_socket():
                        path.unlink(missing_ok=True)
                        removed.append(str(path))
            return removed

        return await asyncio.to_thread(delete)

    async def close(self) -> None:
        await self.connection.close()
