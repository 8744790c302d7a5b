"""A simulated backend: VMs are asyncio tasks that write a console log.

It exists for development, tests and benchmarks. A job steers it through its env:
`NOOP_DURATION_S` (seconds the VM runs, default 0), `NOOP_EXIT_CODE` (default 0),
`NOOP_FAIL` = `boot` (start fails) | `hang` (never stops by itself) | `no-result` (stops
without printing the result line) | `handoff` (a pool VM drops the job handed to it), `NOOP_OUTPUT` (a line written to the console) and
`NOOP_OUTPUT_REPEAT` (how many times, default 1: a guest that prints without end).

It counts, for tests measuring concurrency from outside the daemon, how many VMs are
alive (from `start` until the VM stops or is destroyed): `alive` now, `peak_alive` at most.
"""

from __future__ import annotations

import asyncio
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path

from hypervisors.base import BackendError, BackendName, VmInfo, VmSpec, VmState
from hypervisors.guest import result_line, started_line
from hypervisors.handoff import HandOffError
from hypervisors.statedir import open_private


@dataclass
class _NoopVm:
    spec: VmSpec
    state: VmState = VmState.DEFINED
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    alive: bool = False
    job: asyncio.Future[VmSpec] | None = None  # a pool VM's job, once handed over
    waiting: asyncio.Event = field(default_factory=asyncio.Event)  # a pool VM said it is ready


def _write_console(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_private(path, append=True) as console:
        console.write(text.encode())


async def _print(path: Path, line: str, repeat: int) -> None:
    """`line` `repeat` times, in writes of about 1 MiB, yielding between them as a
    guest's serial port would let the host read meanwhile."""
    per_write = max(1, (1024 * 1024) // max(1, len(line)))
    while repeat > 0:
        count = min(per_write, repeat)
        await asyncio.to_thread(_write_console, path, line * count)
        repeat -= count
        await asyncio.sleep(0.001)


class NoopHypervisor:
    """In-process VMs (benchmarks subclass it to time dispatch to `start`)."""

    name = BackendName.NOOP

    def __init__(self) -> None:
        self._vms: dict[str, _NoopVm] = {}
        self.alive = 0
        self.peak_alive = 0
        self.templates_saved = 0
        self.restores = 0

    async def prepare(self, spec: VmSpec) -> None:
        self._vms[spec.name] = _NoopVm(spec)

    def _vm(self, spec: VmSpec) -> _NoopVm:
        try:
            return self._vms[spec.name]
        except KeyError:
            raise BackendError(f"noop VM {spec.name} was not prepared") from None

    async def start(self, spec: VmSpec) -> None:
        vm = self._vm(spec)
        if spec.env.get("NOOP_FAIL") == "boot":
            raise BackendError(f"noop VM {spec.name} failed to boot (NOOP_FAIL=boot)")
        vm.state = VmState.RUNNING
        vm.alive = True
        self.alive += 1
        self.peak_alive = max(self.peak_alive, self.alive)
        vm.task = asyncio.create_task(self._run(vm), name=f"noop-vm-{spec.name}")

    def _no_longer_alive(self, vm: _NoopVm) -> None:
        if vm.alive:
            vm.alive = False
            self.alive -= 1

    async def save_template(self, spec: VmSpec, template: Path, *, timeout_s: float) -> None:
        """A simulated template: a marker file; the VM is gone afterwards."""
        await self.wait_ready(spec, timeout_s=timeout_s)
        await self.destroy(spec)
        await asyncio.to_thread(template.mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread((template / "noop-template").write_text, spec.name)
        self.templates_saved += 1

    async def restore(self, spec: VmSpec, template: Path) -> None:
        if not (template / "noop-template").exists():
            raise BackendError(f"noop template {template} does not exist")
        await self.prepare(spec)
        await self.start(spec)
        self.restores += 1

    async def wait_ready(self, spec: VmSpec, *, timeout_s: float) -> None:
        vm = self._vms.get(spec.name)
        if vm is None or spec.job_channel is None:
            raise HandOffError(f"noop VM {spec.name} is not a pool VM")
        waiting = asyncio.create_task(vm.waiting.wait())
        stopped = asyncio.create_task(vm.stopped.wait())
        try:
            await asyncio.wait({waiting, stopped}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiting, stopped):
                task.cancel()
        if not vm.waiting.is_set() or vm.stopped.is_set():
            raise HandOffError(f"noop VM {spec.name} did not say it was ready within {timeout_s:g} s")

    async def hand_over(self, spec: VmSpec, job: VmSpec, *, ready_timeout_s: float) -> None:
        """A pool VM (`job_channel` set) runs `job` from now on, as a waiting guest would:
        its output goes to the job's console from here."""
        vm = self._vms.get(spec.name)
        if vm is None or vm.job is None or vm.job.done() or vm.state is not VmState.RUNNING:
            raise HandOffError(f"noop VM {spec.name} is not waiting for a job")
        if job.env.get("NOOP_FAIL") == "handoff":
            raise HandOffError(f"noop VM {spec.name} closed its job port (NOOP_FAIL=handoff)")
        vm.job.set_result(job)

    async def _run(self, vm: _NoopVm) -> None:
        try:
            if vm.spec.job_channel is not None:  # a pool VM: ready, then wait for its job
                vm.job = asyncio.get_running_loop().create_future()
                await asyncio.to_thread(
                    _write_console, vm.spec.console_path, f"noop: {vm.spec.name} is waiting for a job\n"
                )
                vm.waiting.set()
                job = await vm.job
                vm.spec = replace(vm.spec, env=job.env, nonce=job.nonce, console_path=job.console_path)
            env = vm.spec.env
            if env.get("NOOP_FAIL") != "hang":  # "hang" is a guest that never gets as far as the job
                await asyncio.to_thread(_write_console, vm.spec.console_path, started_line(vm.spec.nonce) + "\n")
            output = env.get("NOOP_OUTPUT", "")
            if output:
                await _print(vm.spec.console_path, output + "\n", int(env.get("NOOP_OUTPUT_REPEAT", "1") or 1))
            if env.get("NOOP_FAIL") == "hang":
                await asyncio.Event().wait()
            duration = float(env.get("NOOP_DURATION_S", "0") or 0)
            if duration > 0:
                await asyncio.sleep(duration)
            if env.get("NOOP_FAIL") != "no-result":
                exit_code = int(env.get("NOOP_EXIT_CODE", "0") or 0)
                await asyncio.to_thread(
                    _write_console, vm.spec.console_path, result_line(vm.spec.nonce, exit_code) + "\n"
                )
        finally:
            vm.state = VmState.STOPPED
            self._no_longer_alive(vm)
            vm.stopped.set()

    async def wait_stopped(self, spec: VmSpec) -> VmState:
        vm = self._vms.get(spec.name)
        if vm is None:
            return VmState.GONE
        await vm.stopped.wait()
        return vm.state

    async def shutdown(self, spec: VmSpec, *, timeout_s: float) -> None:
        # A simulated guest has no ACPI handler worth modelling: shutdown is destroy.
        await self.destroy(spec)

    async def destroy(self, spec: VmSpec) -> None:
        vm = self._vms.pop(spec.name, None)
        if vm is None:
            return
        if vm.task is not None and not vm.task.done():
            vm.task.cancel()
            try:
                await vm.task
            except asyncio.CancelledError:
                pass
        # A task cancelled before it ran never reaches its `finally`.
        self._no_longer_alive(vm)
        vm.state = VmState.GONE
        vm.stopped.set()

    async def list_ours(self) -> list[VmInfo]:
        return [
            VmInfo(vm.spec.name, vm.spec.job_id, self.name, vm.state, vm.spec.console_path) for vm in self._vms.values()
        ]

    async def leftovers(self, live_vms: AbstractSet[str]) -> list[str]:
        return []  # a simulated VM leaves nothing behind

    async def close(self) -> None:
        for name in list(self._vms):
            await self.destroy(self._vms[name].spec)
