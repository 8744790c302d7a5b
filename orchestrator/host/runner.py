"""Runs accepted jobs: VM spec → prepare/start → wait (timeout, cancel, drain) → result.

Every job ends in exactly one of: a result stored in the journal and handed to the
outbox, the request handed back to the broker as a new attempt (host shutdown), or left
to another host that has it (superseded: a redelivery of it ran there). The VM is
destroyed and the capacity released in every case.
"""

from __future__ import annotations

import asyncio
import enum
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from hypervisors.base import BackendError, Hypervisor, SeedFiles, VmSpec, VmState
from hypervisors.guest import build_meta_data, build_user_data, file_contains, find_exit_code, started_line
from hypervisors.handoff import HandOffError
from hypervisors.router import RouterHypervisor
from hypervisors.statedir import is_pool_vm, vm_name_for
from orchestrator.core.amqp import ConfirmedPublisher, describe_error
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import ImageEntry
from orchestrator.core.images import ImagePreparer, ImagePrepError
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import EventKind, JobEvent, JobRequest, JobResult, JobStatus
from orchestrator.core.metrics import DaemonMetrics
from orchestrator.core.topology import Topology
from orchestrator.host.capacity import CapacityLedger
from orchestrator.host.console import ConsoleFollower
from orchestrator.host.handback import HandBack, HandBackOutcome, HolderOf
from orchestrator.host.intake import AcceptedJob
from orchestrator.host.journal import JobState, Journal
from orchestrator.host.outbox import ResultOutbox

log = EventLogger("orchestrator.host.runner")

CONSOLE_TAIL_LINES = 40


class StopReason(str, enum.Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"
    SUPERSEDED = "superseded"  # its ack was lost and another host runs the redelivery


@dataclass
class RunningJob:
    job: AcceptedJob
    spec: VmSpec
    backend: Hypervisor
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    released: asyncio.Event = field(default_factory=asyncio.Event)  # gone from `running`
    adopted_started_at: float | None = None  # set for a job taken back after a restart
    interrupted_while_away: bool = False  # its VM was not running when taken back
    handed_over: bool = True  # false for a pool VM's job journaled before its hand-off
    boot_from: float | None = None  # when its own VM was asked for (a cold boot, not adopted)
    superseded_by: str | None = None  # the host that runs it instead (StopReason.SUPERSEDED)
    console: ConsoleFollower = field(init=False)

    console_max_bytes: int = field(kw_only=True)

    def __post_init__(self) -> None:
        self.console = ConsoleFollower(
            self.spec.console_path, max_bytes=self.console_max_bytes, start_marker=started_line(self.job.nonce).encode()
        )


def tail_lines(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def queued_s(job: AcceptedJob) -> float:
    """Request submitted → accepted here (a clock skewed between hosts gives 0, not < 0)."""
    return max(0.0, job.accepted_at - job.request.submitted_at.timestamp())


def job_timeout_s(request: JobRequest, image: ImageEntry, *, default_timeout_s: int) -> int:
    """The request's timeout, else the image's, else the host's; capped by the image."""
    wanted = request.timeout_s or image.timeout_s or default_timeout_s
    return min(wanted, image.max_timeout_s) if image.max_timeout_s else wanted


class JobRunner:
    def __init__(
        self,
        *,
        settings: DaemonSettings,
        router: RouterHypervisor,
        journal: Journal,
        outbox: ResultOutbox,
        publisher: ConfirmedPublisher,
        topology: Topology,
        ledger: CapacityLedger,
        images: ImagePreparer,
        emit: Callable[[str, JobEvent], Awaitable[None]],
        metrics: DaemonMetrics | None = None,
        holder_of: HolderOf | None = None,
    ) -> None:
        self._settings = settings
        self._router = router
        self._journal = journal
        self._outbox = outbox
        self._ledger = ledger
        self._images = images
        self._emit = emit
        self._metrics = metrics
        self._hand_backs = HandBack(publisher=publisher, topology=topology, holder_of=holder_of)
        self.running: dict[str, RunningJob] = {}
        self.finished: Counter[str] = Counter()  # by status, for metrics
        self.warm_fallbacks = 0  # jobs whose pool VM could not take them (booted cold)
        self.idle = asyncio.Event()
        self.idle.set()

    # --- entry points ------------------------------------------------------------------
    def start(
        self,
        job: AcceptedJob,
        *,
        adopted_started_at: float | None = None,
        vm_running: bool = True,
        handed_over: bool = True,
    ) -> None:
        """Run a job; with `adopted_started_at`, take back a job journaled before a
        restart (`vm_running`: whether its VM was still running then; `handed_over`:
        whether the journal says it ran, for a job that had taken a pool VM)."""
        # Both were checked by the intake before the job was accepted.
        backend = self._router.backend_for(job.image.backend)
        if is_pool_vm(job.vm_name):
            spec = self.pool_vm_spec(job)
        else:
            spec = self.build_spec(job)
        running = RunningJob(
            job,
            spec,
            backend,
            adopted_started_at=adopted_started_at,
            interrupted_while_away=adopted_started_at is not None and not vm_running,
            handed_over=handed_over,
            console_max_bytes=self._settings.console_max_bytes,
        )
        self.running[job.job_id] = running
        self.idle.clear()
        # Recorded now rather than with the result, so a long wait shows (and alerts)
        # when the job starts, not hours later when it ends. A job taken back after a
        # restart was recorded by the process that accepted it.
        if self._metrics is not None and adopted_started_at is None:
            self._metrics.job_accepted(label=job.label, queued_s=queued_s(job))
        running.task = asyncio.create_task(self._run(running), name=f"job-{job.job_id}")

    def stop_job(self, job_id: str, reason: StopReason) -> bool:
        running = self.running.get(job_id)
        if running is None:
            return False
        if running.stop_reason is None:
            running.stop_reason = reason
        running.stop_requested.set()
        return True

    def supersede(self, job_id: str, holder: str) -> bool:
        """Stop a job another host runs (its ack here was lost): its VM is destroyed, no
        result is published, the journal says `superseded`. False when it is not running
        here any more, or already stopping for another reason."""
        running = self.running.get(job_id)
        if running is None or running.stop_reason is not None:
            return False
        running.superseded_by = holder
        return self.stop_job(job_id, StopReason.SUPERSEDED)

    async def wait_released(self, job_id: str, timeout_s: float) -> bool:
        """Wait until this host holds `job_id` no more (a job being handed back is
        published before it is let go); False when it still does after `timeout_s`."""
        running = self.running.get(job_id)
        if running is None:
            return True
        try:
            await asyncio.wait_for(running.released.wait(), timeout=timeout_s)
            return True
        except TimeoutError:
            return False

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=timeout_s)
            return True
        except TimeoutError:
            return False

    # --- the job -------------------------------------------------------------------------
    def pool_vm_spec(self, job: AcceptedJob) -> VmSpec:
        """The pool VM a job took, as the runner knows it: its name, job port and disk,
        with the job's console (a second name for the pool VM's console file)."""
        if job.warm is not None:
            base = job.warm.spec
        else:  # taken back after a restart: the VM is known by its name
            base = VmSpec(
                name=job.vm_name,
                job_id="",
                image_path=None,
                image_format=None,
                cpus=job.resources.cpus,
                memory_mb=job.resources.memory_mb,
                disk_gb=job.resources.disk_gb,
                console_path=self._settings.state.console(job.vm_name),
                job_channel=self._settings.state.channel(job.vm_name),
            )
        return replace(
            base,
            job_id=job.job_id,
            console_path=self._settings.state.console(job.job_id),
            env=dict(job.request.env),
            nonce=job.nonce,
        )

    def build_spec(self, job: AcceptedJob, *, vm_name: str | None = None) -> VmSpec:
        """A cold VM for the job (named `vm_name`, else the job's VM name)."""
        request, image = job.request, job.image
        env = dict(request.env)
        seed = None
        if image.nocloud:
            seed = SeedFiles(
                user_data=build_user_data(
                    job_id=job.job_id,
                    nonce=job.nonce,
                    env=env,
                    repo_url=request.repo_url,
                    commit_sha=request.commit_sha,
                    checkout=image.checkout,
                    script=request.script,
                    script_path=request.script_path,
                ),
                meta_data=build_meta_data(job_id=job.job_id, hostname=(vm_name or job.vm_name)[:63]),
            )
        return VmSpec(
            name=vm_name or job.vm_name,
            job_id=job.job_id,
            image_path=image.local_path,
            image_format=image.format,
            cpus=job.resources.cpus,
            memory_mb=job.resources.memory_mb,
            disk_gb=job.resources.disk_gb,
            console_path=self._settings.state.console(job.job_id),
            seed=seed,
            direct_boot=image.direct_boot(),
            env=env,
            nonce=job.nonce,
        )

    async def _run(self, running: RunningJob) -> None:
        job = running.job
        jlog = log.bind(job_id=job.job_id, label=job.label, host=self._settings.host_name)
        accepted_at = job.accepted_at
        started_at = running.adopted_started_at
        try:
            if started_at is None:
                started_at = await self._provision(running, jlog, accepted_at)
                if started_at is None:
                    return
            else:
                jlog.info("job.adopted", vm=running.spec.name, started_at=started_at)
                if (
                    is_pool_vm(running.spec.name)
                    and not running.handed_over
                    and not await self._began_before_restart(running)
                ):
                    await running.backend.destroy(running.spec)
                    await self._hand_back(
                        running, jlog, "its pool VM had not been given the job when the daemon stopped"
                    )
                    return
            running.console.start()  # (a no-op when the hand-off started it)
            outcome, summary, vm_state = await self._watch(running, started_at)
            if outcome is None and running.stop_reason is StopReason.SUPERSEDED:
                await self._journal.move(job.job_id, JobState.SUPERSEDED)
                jlog.info(
                    "job.superseded",
                    attempt=job.request.attempt,
                    holder=running.superseded_by,
                    reason="its ack was lost with the broker connection; the broker gave it to that host",
                )
                return
            if outcome is None:
                await self._hand_back(running, jlog, "host shutting down")
                return
            tail = await running.console.finish()
            exit_code = find_exit_code(tail, job.nonce)
            status = outcome
            if outcome is JobStatus.SUCCEEDED:  # the VM stopped by itself: what did it say?
                if exit_code is None and (vm_state is VmState.GONE or running.interrupted_while_away):
                    # Its VM vanished or stopped while the daemon was down (host reboot,
                    # manual cleanup) before reporting: run it again.
                    await self._hand_back(running, jlog, "its VM stopped or vanished while the daemon was down")
                    return
                if exit_code is None:
                    status, summary = (
                        JobStatus.ERROR,
                        "the VM powered off without reporting a result (see console_tail)",
                    )
                elif exit_code != 0:
                    status, summary = JobStatus.FAILED, f"job script exited with {exit_code}"
                else:
                    summary = "job script exited with 0"
            await self._finish(running, status, summary, exit_code, tail, accepted_at, started_at)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            jlog.error("job.crashed", error=repr(exc), exc_info=True)
            tail = await running.console.finish()
            await self._finish(
                running, JobStatus.ERROR, f"orchestrator error: {exc!r}", None, tail, accepted_at, started_at
            )
        finally:
            if job.warm is not None:
                job.warm.began.set()  # the pool may refill (if its first command never came)
            await running.console.finish()
            try:
                await running.backend.destroy(running.spec)
            except Exception as exc:
                jlog.error("vm.destroy_failed", error=str(exc))
            self._ledger.release(job.reservation)
            self.running.pop(job.job_id, None)
            running.released.set()
            if not self.running:
                self.idle.set()

    async def _provision(self, running: RunningJob, jlog: EventLogger, accepted_at: float) -> float | None:
        """Image, VM, start; the start time, or None when the job already has its result."""
        job = running.job
        await self._emit(f"job.accepted.{job.label}", self._event(job, EventKind.ACCEPTED))
        if job.warm is not None:
            if await self._hand_over(running, jlog):
                return await self._started(running, jlog)
            await self._to_cold_vm(running, jlog)
        spec, backend = running.spec, running.backend
        if job.image.source is not None:
            try:
                # Returns at once for a ready image; waits for one being prepared.
                await self._images.ensure(job.label)
            except ImagePrepError as exc:
                await self._finish(running, JobStatus.ERROR, str(exc), None, "", accepted_at, None)
                return None
        await running.console.skip_existing()
        running.boot_from = time.time()
        try:
            await backend.prepare(spec)
            await backend.start(spec)
        except BackendError as exc:
            jlog.error("vm.start_failed", error=str(exc))
            tail = await running.console.finish()
            await self._finish(running, JobStatus.ERROR, f"VM failed to start: {exc}", None, tail, accepted_at, None)
            return None
        return await self._started(running, jlog)

    async def _started(self, running: RunningJob, jlog: EventLogger) -> float:
        job = running.job
        started_at = time.time()
        await self._journal.move(job.job_id, JobState.RUNNING, started_at=started_at)
        jlog.info(
            "job.started", vm=running.spec.name, backend=running.backend.name.value, warm=is_pool_vm(running.spec.name)
        )
        await self._emit(f"job.started.{job.label}", self._event(job, EventKind.STARTED))
        return started_at

    async def _hand_over(self, running: RunningJob, jlog: EventLogger) -> bool:
        """Give the job to the pool VM it took (journaled as its VM by the intake): its
        console gets the job's name, the VM its script. False when that failed."""
        job, vm = running.job, running.job.warm
        assert vm is not None
        try:
            await asyncio.to_thread(os.link, vm.spec.console_path, running.spec.console_path)
            await asyncio.to_thread(vm.spec.console_path.unlink)  # the job's name is the one kept
            await running.console.skip_existing()  # the pool VM's boot is not the job's output
            running.console.start()
            await running.backend.hand_over(
                running.spec, self.build_spec(job), ready_timeout_s=self.boot_timeout_s(job)
            )
        except (HandOffError, OSError) as exc:
            self.warm_fallbacks += 1
            jlog.warning("job.hand_off_failed", vm=vm.name, error=str(exc), fallback="cold boot")
            return False
        jlog.info("job.handed_over", vm=vm.name)
        return True

    async def _to_cold_vm(self, running: RunningJob, jlog: EventLogger) -> None:
        """The pool VM could not take the job: destroy it and boot the job a VM of its own."""
        job, vm = running.job, running.job.warm
        assert vm is not None
        await running.console.finish()
        await running.backend.destroy(running.spec)
        await asyncio.to_thread(vm.spec.console_path.unlink, missing_ok=True)
        cold_name = vm_name_for(job.job_id)
        await self._journal.move_to_vm(job.job_id, cold_name)
        running.spec = self.build_spec(job, vm_name=cold_name)
        running.console = ConsoleFollower(
            running.spec.console_path,
            max_bytes=self._settings.console_max_bytes,
            start_marker=started_line(job.nonce).encode(),
        )
        jlog.info("job.cold_after_hand_off", vm=cold_name)

    async def _began_before_restart(self, running: RunningJob) -> bool:
        """Whether a pool VM's job, journaled before its hand-off, had begun when the
        daemon stopped: its script prints its start line first thing."""
        marker = started_line(running.job.nonce).encode()
        return await asyncio.to_thread(file_contains, running.spec.console_path, marker)

    def timeout_s(self, job: AcceptedJob) -> int:
        return job_timeout_s(job.request, job.image, default_timeout_s=self._settings.default_timeout_s)

    def boot_timeout_s(self, job: AcceptedJob) -> float:
        return job.image.boot_timeout_s or self._settings.boot_timeout_s

    async def _watch(self, running: RunningJob, started_at: float) -> tuple[JobStatus | None, str, VmState | None]:
        """Wait for the VM to stop, a timeout, or a stop request. The status is SUCCEEDED
        for "stopped by itself" (the console decides), None for "hand it back" (or, after
        `supersede`, for "another host runs it")."""
        job, spec, backend = running.job, running.spec, running.backend
        timeout_s = self.timeout_s(job)
        elapsed = time.time() - started_at  # an adopted VM has been running already
        boot_timeout_s = self.boot_timeout_s(job)
        stopped = asyncio.create_task(backend.wait_stopped(spec))
        stop_requested = asyncio.create_task(running.stop_requested.wait())
        booted = asyncio.create_task(running.console.has_output.wait())
        if job.warm is not None:
            # The pool refills once a taken VM's job is under way (`WarmPools.take`).
            booted.add_done_callback(lambda _: job.warm.began.set() if job.warm is not None else None)
        waiting = {stopped, stop_requested}
        boot_deadline = asyncio.get_running_loop().time() + max(0.0, boot_timeout_s - elapsed)
        deadline = asyncio.get_running_loop().time() + max(0.0, timeout_s - elapsed)
        timed_out_booting = False
        try:
            while True:
                now = asyncio.get_running_loop().time()
                watch = waiting | ({booted} if not booted.done() else set())
                until = min(deadline, boot_deadline) if not booted.done() else deadline
                done, _ = await asyncio.wait(watch, timeout=max(0.0, until - now), return_when=asyncio.FIRST_COMPLETED)
                if done & waiting:
                    break
                now = asyncio.get_running_loop().time()
                if not booted.done() and now >= boot_deadline:
                    await running.console.poll()
                    if not running.console.has_output.is_set():
                        timed_out_booting = True
                        break
                if now >= deadline:
                    break
        finally:
            for task in (stop_requested, booted):
                task.cancel()
        if stopped.done():
            return JobStatus.SUCCEEDED, "", stopped.result()
        stopped.cancel()
        if running.stop_reason is StopReason.SHUTDOWN:
            await backend.shutdown(spec, timeout_s=self._settings.shutdown_timeout_s)
            return None, "host shutting down", None
        await backend.destroy(spec)
        if running.stop_reason is StopReason.SUPERSEDED:
            return None, f"host {running.superseded_by} runs it", None
        if running.stop_reason is StopReason.CANCEL:
            return JobStatus.CANCELLED, "cancelled on request; the VM was destroyed", None
        if timed_out_booting:
            return (
                JobStatus.ERROR,
                f"boot timeout: no console output within {boot_timeout_s:g} s; the VM was destroyed",
                None,
            )
        return JobStatus.TIMEOUT, f"job did not finish within {timeout_s} s; the VM was destroyed", None

    async def _finish(
        self,
        running: RunningJob,
        status: JobStatus,
        summary: str,
        exit_code: int | None,
        console_text: str,
        accepted_at: float,
        started_at: float | None,
    ) -> None:
        job = running.job
        now = time.time()
        timings = {"total_s": round(now - accepted_at, 3)}
        if running.console.started_at is not None and running.adopted_started_at is None:
            timings["to_first_command_s"] = round(max(0.0, running.console.started_at - accepted_at), 3)
        if started_at is not None:
            timings["run_s"] = round(now - started_at, 3)
        timings["queued_s"] = round(queued_s(job), 3)
        result = JobResult.for_request(
            job.request,
            status=status,
            summary=summary,
            exit_code=exit_code,
            host=self._settings.host_name,
            label=job.label,
            started_at=datetime.fromtimestamp(started_at, UTC) if started_at else None,
            console_tail=tail_lines(console_text) if status is not JobStatus.SUCCEEDED else None,
            log_url=self._log_url(job.job_id),
            timings=timings,
        )
        self.finished[status.value] += 1
        self._observe(running, status, timings)
        log.info(
            "job.finished",
            job_id=job.job_id,
            label=job.label,
            status=status.value,
            exit_code=exit_code,
            summary=summary,
        )
        await self._outbox.deliver(result, stored=False)
        await self._emit(f"job.finished.{job.label}", self._event(job, EventKind.FINISHED, status))

    def _observe(self, running: RunningJob, status: JobStatus, timings: dict[str, float]) -> None:
        if self._metrics is None:
            return
        first_command_at, boot_from = running.console.started_at, running.boot_from
        self._metrics.job_finished(
            label=running.job.label,
            status=status.value,
            warm=is_pool_vm(running.spec.name),
            run_s=timings.get("run_s"),
            to_first_command_s=timings.get("to_first_command_s"),
            boot_s=first_command_at - boot_from if first_command_at is not None and boot_from is not None else None,
        )

    async def _hand_back(self, running: RunningJob, jlog: EventLogger, reason: str) -> None:
        """The job cannot finish here (host shutting down, VM gone): give it to any host
        as its next attempt, or give up with an error after `max_attempts`; unless
        another host has it already (`handback.py`)."""
        request = running.job.request
        # Its VM is gone (shut down, destroyed, or lost while the daemon was away): the
        # capacity is free now, not only once the fleet has answered and the broker taken it.
        self._ledger.release(running.job.reservation)
        try:
            outcome, holder = await self._hand_backs.give_back(
                request,
                running.job.label,
                jlog=jlog,
                stopping=lambda: running.stop_reason is StopReason.SHUTDOWN,
                max_attempts=self._settings.max_attempts,
            )
        except Exception as exc:
            # The broker is away: the job stays live in the journal, and the next start
            # of this daemon finds its VM gone and hands it back then.
            jlog.error("job.hand_back_failed", error=describe_error(exc), reason=reason)
            return
        if outcome is HandBackOutcome.SUPERSEDED and holder is not None:
            await self._journal.move(request.job_id, JobState.SUPERSEDED)
            jlog.info(
                "job.superseded", attempt=request.attempt, holder=holder.host, holder_state=holder.state, reason=reason
            )
            return
        if outcome is HandBackOutcome.LAST_ATTEMPT:
            await self._finish(
                running,
                JobStatus.ERROR,
                f"gave up after attempt {request.attempt} of {self._settings.max_attempts}: {reason}",
                None,
                "",
                running.job.accepted_at,
                None,
            )
            return
        await self._journal.move(request.job_id, JobState.REQUEUED)
        jlog.info("job.requeued", attempt=request.attempt + 1, reason=reason)
        await self._emit(f"job.requeued.{running.job.label}", self._event(running.job, EventKind.REQUEUED))

    def _event(self, job: AcceptedJob, kind: EventKind, status: JobStatus | None = None) -> JobEvent:
        return JobEvent(
            kind=kind,
            request_id=job.request.request_id,
            host=self._settings.host_name,
            label=job.label,
            status=status,
            log_url=self._log_url(job.job_id),
        )

    def _log_url(self, job_id: str) -> str | None:
        return f"{self._settings.public_url}/jobs/{job_id}/log" if self._settings.public_url else None
