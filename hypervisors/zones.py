"""illumos bhyve zones: one zone per job, its boot disk a ZFS clone of the image's zvol.

Lifecycle: `zfs clone` the image's `@base` snapshot (made once per image from the raw
image file), write the NoCloud seed ISO, `zonecfg` a bhyve zone that boots the clone
with the seed as its CD-ROM, `zoneadm install` and `boot`; poll `zoneadm list -p` until
the zone is back to `installed` (the guest powered off); then `halt`, `uninstall -F`,
`zonecfg delete -F`, `zfs destroy`. Our zones carry `orch-*` attributes (orchestrator
id, job id, console path): zones without them are never touched.

Every value given to zonecfg is a validated name, number or a path under STATE_DIR, and
is double-quoted; the tools run with argument lists, never through a shell.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Set as AbstractSet
from pathlib import Path

from hypervisors.base import BackendError, BackendName, ImageFormat, VmInfo, VmSpec, VmState
from hypervisors.handoff import HandOffError
from hypervisors.seed import write_seed_iso
from hypervisors.statedir import StateDir, open_private, vm_of_file

POLL_S = 2.0
CONSOLE_SOCKET = "/tmp/vm.com1"
CONSOLE_CONNECT_S = 30.0


class ZoneTools:
    """Runs zonecfg/zoneadm/zfs. `bin_dir` lets tests put fakes first (the only fakes
    this project allows: these commands cannot run off illumos)."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self._bin_dir = bin_dir

    async def run(self, tool: str, *args: str, check: bool = True) -> tuple[int, str, str]:
        executable = str(self._bin_dir / tool) if self._bin_dir else tool
        try:
            process = await asyncio.create_subprocess_exec(
                executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError:
            raise BackendError(f"{tool} is not available: the zones backend needs an illumos host") from None
        stdout, stderr = await process.communicate()
        out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace").strip()
        if check and process.returncode != 0:
            raise BackendError(f"{tool} {' '.join(args[:3])} failed: {err or out}")
        return process.returncode or 0, out, err


def _zone_state(state: str) -> VmState:
    """A zone state from `zoneadm list -p` as ours: a zone back to `installed` has a
    guest that powered off."""
    return VmState.RUNNING if state in ("running", "ready", "shutting_down") else VmState.STOPPED


def _quote(value: str) -> str:
    if '"' in value or "\n" in value:
        raise BackendError(f"refusing to pass {value!r} to zonecfg")
    return f'"{value}"'


class ZonesHypervisor:
    name = BackendName.ZONES

    def __init__(
        self,
        *,
        state_dir: Path,
        orchestrator_id: str,
        dataset: str = "rpool/orchestrator",
        zonepath_root: Path = Path("/zones"),
        global_nic: str | None = None,
        tools: ZoneTools | None = None,
        zvol_devices: Path = Path("/dev/zvol/rdsk"),
    ) -> None:
        self._paths = StateDir(state_dir)
        self._orchestrator_id = orchestrator_id
        self._dataset = dataset
        self._zonepath_root = zonepath_root
        self._global_nic = global_nic
        self._tools = tools or ZoneTools()
        self._zvol_devices = zvol_devices
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._consoles: dict[str, asyncio.Task[None]] = {}

    def _clone(self, spec: VmSpec) -> str:
        return f"{self._dataset}/vms/{spec.name}"

    def _seed(self, spec: VmSpec) -> Path:
        return self._paths.seed(spec.name)

    async def _base_snapshot(self, image: Path) -> str:
        """`<dataset>/images/<stem>@base`, made once from the raw image file."""
        volume = f"{self._dataset}/images/{image.stem}"
        snapshot = f"{volume}@base"
        lock = self._image_locks.setdefault(volume, asyncio.Lock())
        async with lock:
            code, _, _ = await self._tools.run("zfs", "list", "-H", "-o", "name", snapshot, check=False)
            if code == 0:
                return snapshot
            size = (await asyncio.to_thread(image.stat)).st_size
            await self._tools.run("zfs", "create", "-p", "-V", str(size), volume)
            await asyncio.to_thread(_copy_into, image, self._zvol_devices / volume)
            await self._tools.run("zfs", "snapshot", snapshot)
        return snapshot

    def _zonecfg_script(self, spec: VmSpec) -> str:
        clone = self._clone(spec)
        lines = [
            "create -b",
            "set brand=bhyve",
            f"set zonepath={_quote(str(self._zonepath_root / spec.name))}",
            "set autoboot=false",
            "set ip-type=exclusive",
            f"add device; set match={_quote('/dev/zvol/rdsk/' + clone)}; end",
        ]
        attrs = {
            "bootdisk": clone,
            # The guest's serial console on a socket inside the zone root; `start`
            # copies it into the job's console file.
            "com1": f"socket,{CONSOLE_SOCKET}",
            "vcpus": str(spec.cpus),
            "ram": f"{spec.memory_mb}M",
            "orch-orchestrator": self._orchestrator_id,
            "orch-job-id": spec.job_id,
            "orch-console": str(spec.console_path),
        }
        if spec.seed is not None:
            seed = str(self._seed(spec))
            lines.append(
                f"add fs; set dir={_quote(seed)}; set special={_quote(seed)}; set type=lofs; add options ro; end"
            )
            attrs["cdrom"] = seed
        for name, value in attrs.items():
            lines.append(f"add attr; set name={name}; set type=string; set value={_quote(value)}; end")
        if self._global_nic:
            lines.append(f"add anet; set linkname=net0; set lower-link={_quote(self._global_nic)}; end")
        lines.append("commit")
        return "\n".join(lines) + "\n"

    async def prepare(self, spec: VmSpec) -> None:
        if spec.image_path is None or spec.image_format is not ImageFormat.RAW:
            raise BackendError(f"VM {spec.name}: bhyve zones boot raw images; set format: raw in the image map")
        snapshot = await self._base_snapshot(spec.image_path)
        clone = self._clone(spec)
        await self._tools.run("zfs", "clone", "-p", snapshot, clone)
        if spec.disk_gb is not None:
            await self._tools.run("zfs", "set", f"volsize={spec.disk_gb}G", clone, check=False)
        if spec.seed is not None:
            await asyncio.to_thread(write_seed_iso, spec.seed, self._seed(spec))
        spec.console_path.parent.mkdir(parents=True, exist_ok=True)
        script = self._paths.zonecfg(spec.name)
        await asyncio.to_thread(script.write_text, self._zonecfg_script(spec))
        try:
            await self._tools.run("zonecfg", "-z", spec.name, "-f", str(script))
            await self._tools.run("zoneadm", "-z", spec.name, "install")
        finally:
            script.unlink(missing_ok=True)

    async def start(self, spec: VmSpec) -> None:
        await self._tools.run("zoneadm", "-z", spec.name, "boot")
        socket_path = self._zonepath_root / spec.name / "root" / CONSOLE_SOCKET.lstrip("/")
        self._consoles[spec.name] = asyncio.create_task(_copy_console(socket_path, spec.console_path))

    async def wait_ready(self, spec: VmSpec, *, timeout_s: float) -> None:
        raise HandOffError("the zones backend has no warm pools (bhyve has no job port here)")

    async def save_template(self, spec: VmSpec, template: Path, *, timeout_s: float) -> None:
        raise BackendError("the zones backend has no warm pools")

    async def restore(self, spec: VmSpec, template: Path) -> None:
        raise BackendError("the zones backend has no warm pools")

    async def hand_over(self, spec: VmSpec, job: VmSpec, *, ready_timeout_s: float) -> None:
        raise HandOffError("the zones backend has no warm pools (bhyve has no job port here)")

    async def _state(self, name: str) -> VmState:
        code, out, _ = await self._tools.run("zoneadm", "-z", name, "list", "-p", check=False)
        if code != 0:
            return VmState.GONE
        fields = out.strip().split(":")
        return _zone_state(fields[2] if len(fields) > 2 else "")

    async def wait_stopped(self, spec: VmSpec) -> VmState:
        while True:
            state = await self._state(spec.name)
            if state is not VmState.RUNNING:
                console = self._consoles.get(spec.name)
                if console is not None:  # the guest is gone: the socket drains and closes
                    await asyncio.wait({console}, timeout=5)
                return state
            await asyncio.sleep(POLL_S)

    async def shutdown(self, spec: VmSpec, *, timeout_s: float) -> None:
        await self._tools.run("zoneadm", "-z", spec.name, "shutdown", check=False)
        try:
            await asyncio.wait_for(self.wait_stopped(spec), timeout=timeout_s)
        except TimeoutError:
            pass
        await self.destroy(spec)

    async def destroy(self, spec: VmSpec) -> None:
        console = self._consoles.pop(spec.name, None)
        if console is not None:
            console.cancel()
            await asyncio.gather(console, return_exceptions=True)
        await self._remove_zone(spec.name)
        await self._tools.run("zfs", "destroy", "-r", self._clone(spec), check=False)
        await asyncio.to_thread(self._seed(spec).unlink, missing_ok=True)

    async def _remove_zone(self, name: str) -> None:
        if await self._state(name) is VmState.GONE:
            return
        await self._tools.run("zoneadm", "-z", name, "halt", check=False)
        await self._tools.run("zoneadm", "-z", name, "uninstall", "-F", check=False)
        await self._tools.run("zonecfg", "-z", name, "delete", "-F")

    async def _attr(self, name: str, attr: str) -> str | None:
        code, out, _ = await self._tools.run("zonecfg", "-z", name, "info", "attr", f"name={attr}", check=False)
        if code != 0:
            return None
        for line in out.splitlines():
            key, _, value = line.strip().partition(":")
            if key == "value":
                return value.strip()
        return None

    async def list_ours(self) -> list[VmInfo]:
        _, out, _ = await self._tools.run("zoneadm", "list", "-cp")
        found = []
        for line in out.splitlines():
            fields = line.split(":")
            if len(fields) < 3 or not fields[1].startswith("job-"):
                continue
            name = fields[1]
            if await self._attr(name, "orch-orchestrator") != self._orchestrator_id:
                continue
            job_id = await self._attr(name, "orch-job-id") or ""
            console = await self._attr(name, "orch-console")
            found.append(
                VmInfo(name, job_id, BackendName.ZONES, _zone_state(fields[2]), Path(console) if console else None)
            )
        return found

    async def leftovers(self, live_vms: AbstractSet[str]) -> list[str]:
        """Seed ISOs and zonecfg scripts of VMs that are not live, and ZFS clones under
        `<dataset>/vms/` whose zone is gone (a crash between `zfs clone` and `zonecfg`,
        or a zone deleted by hand)."""
        paths = self._paths

        def delete_files() -> list[str]:
            removed = []
            if paths.seeds.is_dir():
                for path in paths.seeds.iterdir():
                    vm = vm_of_file(path)
                    if vm is not None and vm not in live_vms and path.suffix in (".iso", ".zonecfg", ".partial"):
                        path.unlink(missing_ok=True)
                        removed.append(str(path))
            return removed

        removed = await asyncio.to_thread(delete_files)
        parent = f"{self._dataset}/vms"
        code, out, _ = await self._tools.run("zfs", "list", "-H", "-o", "name", "-d", "1", parent, check=False)
        if code != 0:
            return removed  # no clone was ever made on this host
        for clone in out.split():
            name = clone.rpartition("/")[2]
            vm = vm_of_file(Path(name + "."))
            if clone == parent or vm is None or vm in live_vms:
                continue
            if await self._state(name) is not VmState.GONE:
                continue  # its zone is still there: the orphan-VM path destroys both
            await self._tools.run("zfs", "destroy", "-r", clone, check=False)
            removed.append(clone)
        return removed

    async def close(self) -> None:
        for task in self._consoles.values():
            task.cancel()
        await asyncio.gather(*self._consoles.values(), return_exceptions=True)
        self._consoles.clear()


async def _copy_console(socket_path: Path, console_path: Path) -> None:
    """Append everything the guest writes to its serial socket to the console file."""
    deadline = asyncio.get_running_loop().time() + CONSOLE_CONNECT_S
    while True:
        try:
            reader, writer = await asyncio.open_unix_connection(str(socket_path))
            break
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                return
            await asyncio.sleep(0.2)
    try:
        with open_private(console_path, append=True) as console:
            while chunk := await reader.read(65536):
                await asyncio.to_thread(console.write, chunk)
                await asyncio.to_thread(console.flush)
    finally:
        writer.close()


def _copy_into(image: Path, device: Path) -> None:
    with image.open("rb") as source, device.open("r+b") as target:
        while chunk := source.read(8 * 1024 * 1024):
            target.write(chunk)
        target.flush()
        os.fsync(target.fileno())
