"""Runs accepted jobs: VM spec → prepare/start → wait (timeout, cancel, drain) → result.

Every job ends in exactly one of: a result stored in the journal and handed to the
outbox, or the request handed back to the broker as a new attempt (host shutdown). The
VM is destroyed and the capacity released in every case.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from hypervisors.base import BackendError, DirectBoot, Hypervisor, SeedFiles, VmSpec
from hypervisors.guest import build_meta_data, build_user_data, find_exit_code
from hypervisors.router import RouterHypervisor
from orchestrator.amqp import ConfirmedPublisher, json_message
from orchestrator.capacity import CapacityLedger
from orchestrator.config import DaemonSettings
from orchestrator.console import ConsoleFollower
from orchestrator.images import ImagePreparer, ImagePrepError
from orchestrator.intake import AcceptedJob
from orchestrator.journal import JobState, Journal
from orchestrator.logsetup import EventLogger
from orchestrator.messages import EventKind, JobEvent, JobResult, JobStatus
from orchestrator.outbox import ResultOutbox
from orchestrator.topology import Topology

log = EventLogger("orchestrator.runner")

CONSOLE_TAIL_LINES = 40


class StopReason(str, enum.Enum):
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


@dataclass
class RunningJob:
    job: AcceptedJob
    spec: VmSpec
    backend: Hypervisor
    task: asyncio.Task[None] | None = None
    stop_reason: StopReason | None = None
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    console: ConsoleFollower = field(init=False)

    def __post_init__(self) -> None:
        self.console = ConsoleFollower(self.spec.console_path)


def tail_lines(text: str, lines: int = CONSOLE_TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-lines:])


def console_path(settings: DaemonSettings, job_id: str) -> Path:
    return settings.logs_dir / f"{job_id}.console"


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
    ) -> None:
        self._settings = settings
        self._router = router
        self._journal = journal
        self._outbox = outbox
        self._publisher = publisher
        self._topology = topology
        self._ledger = ledger
        self._images = images
        self._emit = emit
        self.running: dict[str, RunningJob] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    # --- entry points ------------------------------------------------------------------
    def start(self, job: AcceptedJob) -> None:
        # Both were checked by the intake before the job was accepted.
        spec = self.build_spec(job)
        backend = self._router.backend_for(job.image.backend)
        running = RunningJob(job, spec, backend)
        self.running[job.job_id] = running
        self.idle.clear()
        running.task = asyncio.create_task(self._run(running), name=f"job-{job.job_id}")

    def stop_job(self, job_id: str, reason: StopReason) -> bool:
        running = self.running.get(job_id)
        if running is None:
            return False
        if running.stop_reason is None:
            running.stop_reason = reason
        running.stop_requested.set()
        return True

    async def wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.idle.wait(), timeout=timeout_s)
            return True
        except TimeoutError:
            return False

    # --- the job -------------------------------------------------------------------------
    def build_spec(self, job: AcceptedJob) -> VmSpec:
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
                meta_data=build_meta_data(job_id=job.job_id, hostname=job.vm_name[:63]),
            )
        direct_boot = None
        if image.kernel is not None:
            direct_boot = DirectBoot(kernel=image.kernel, initrd=image.initrd, cmdline=image.cmdline)
        return VmSpec(
            name=job.vm_name,
            job_id=job.job_id,
            image_path=image.local_path,
            image_format=image.format,
            cpus=job.resources.cpus,
            memory_mb=job.resources.memory_mb,
            disk_gb=job.resources.disk_gb,
            console_path=console_path(self._settings, job.job_id),
            seed=seed,
            direct_boot=direct_boot,
            env=env,
            nonce=job.nonce,
        )

    def _timeout_s(self, job: AcceptedJob) -> int:
        return job.request.timeout_s or job.image.timeout_s or self._settings.default_timeout_s

    async def _run(self, running: RunningJob) -> None:
        job, spec, backend = running.job, running.spec, running.backend
        jlog = log.bind(job_id=job.job_id, label=job.label, host=self._settings.host_name)
        accepted_at = time.time()
        started_at: float | None = None
        try:
            await self._emit(f"job.accepted.{job.label}", self._event(job, EventKind.ACCEPTED))
            if job.image.source is not None:
                try:
                    # Returns at once for a ready image; waits for one being prepared.
                    await self._images.ensure(job.label)
                except ImagePrepError as exc:
                    await self._finish(running, JobStatus.ERROR, str(exc), None, "", accepted_at, None)
                    return
            try:
                await backend.prepare(spec)
                await backend.start(spec)
            except BackendError as exc:
                jlog.error("vm.start_failed", error=str(exc))
                tail = await running.console.finish()
                await self._finish(running, JobStatus.ERROR, f"VM failed to start: {exc}", None, tail, accepted_at, None)
                return
            started_at = time.time()
            running.console.start()
            await self._journal.move(job.job_id, JobState.RUNNING, started_at=started_at)
            jlog.info("job.started", vm=spec.name, backend=backend.name.value)
            await self._emit(f"job.started.{job.label}", self._event(job, EventKind.STARTED))
            status, summary = await self._watch(running)
            if status is None:
                await self._hand_back(running, jlog)
                return
            tail = await running.console.finish()
            exit_code = find_exit_code(tail, job.nonce)
            if status is JobStatus.SUCCEEDED:  # the VM stopped by itself: what did it say?
                if exit_code is None:
                    status, summary = JobStatus.ERROR, "the VM powered off without reporting a result (see console_tail)"
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
            await self._finish(running, JobStatus.ERROR, f"orchestrator error: {exc!r}", None, tail, accepted_at, started_at)
        finally:
            await running.console.finish()
            try:
                await backend.destroy(spec)
            except Exception as exc:
                jlog.error("vm.destroy_failed", error=str(exc))
            self._ledger.release(job.reservation)
            self.running.pop(job.job_id, None)
            if not self.running:
                self.idle.set()

    async def _watch(self, running: RunningJob) -> tuple[JobStatus | None, str]:
        """Wait for the VM to stop, the timeout, or a stop request. Returns the status
        (SUCCEEDED meaning "stopped by itself"; the console decides), or None for a
        job to hand back to the broker."""
        job, spec, backend = running.job, running.spec, running.backend
        timeout_s = self._timeout_s(job)
        stopped = asyncio.create_task(backend.wait_stopped(spec))
        stop_requested = asyncio.create_task(running.stop_requested.wait())
        try:
            done, _ = await asyncio.wait({stopped, stop_requested}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_requested.cancel()
        if stopped in done:
            return JobStatus.SUCCEEDED, ""
        stopped.cancel()
        if running.stop_reason is StopReason.SHUTDOWN:
            await backend.shutdown(spec, timeout_s=self._settings.shutdown_timeout_s)
            return None, "host shutting down"
        await backend.destroy(spec)
        if running.stop_reason is StopReason.CANCEL:
            return JobStatus.CANCELLED, "cancelled on request"
        return JobStatus.TIMEOUT, f"job did not finish within {timeout_s} s; the VM was destroyed"

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
        if started_at is not None:
            timings["run_s"] = round(now - started_at, 3)
        submitted = job.request.submitted_at.timestamp()
        timings["queued_s"] = round(max(0.0, accepted_at - submitted), 3)
        result = JobResult.for_request(
            job.request,
            status=status,
            summary=summary,
            exit_code=exit_code,
            host=self._settings.host_name,
            label=job.label,
            started_at=datetime.fromtimestamp(started_at, UTC) if started_at else None,
            console_tail=tail_lines(console_text) if status is not JobStatus.SUCCEEDED else None,
            timings=timings,
        )
        log.info("job.finished", job_id=job.job_id, label=job.label, status=status.value, exit_code=exit_code, summary=summary)
        await self._outbox.deliver(result, stored=False)
        await self._emit(f"job.finished.{job.label}", self._event(job, EventKind.FINISHED, status))

    async def _hand_back(self, running: RunningJob, jlog: EventLogger) -> None:
        """The host is going away mid-job: give the job to another host as a new attempt."""
        request = running.job.request
        if request.attempt >= self._settings.max_attempts:
            await self._finish(
                running, JobStatus.ERROR,
                f"interrupted by host shutdown on attempt {request.attempt} of {self._settings.max_attempts}",
                None, "", time.time(), None,
            )
            return
        retry = request.model_copy(update={"attempt": request.attempt + 1})
        await self._publisher.publish(
            self._topology.jobs, running.job.label, json_message(retry, message_id=f"{request.job_id}/{retry.attempt}")
        )
        await self._journal.move(request.job_id, JobState.REQUEUED)
        jlog.info("job.requeued", attempt=retry.attempt, reason="host shutdown")
        await self._emit(f"job.requeued.{running.job.label}", self._event(running.job, EventKind.REQUEUED))

    def _event(self, job: AcceptedJob, kind: EventKind, status: JobStatus | None = None) -> JobEvent:
        return JobEvent(kind=kind, request_id=job.request.request_id, host=self._settings.host_name, label=job.label, status=status)
