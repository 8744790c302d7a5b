"""Start-up reconciliation of the journal with the hypervisors (DESIGN.md "Durability").

For every job the journal says is live (accepted or running) the runner takes it back:
a running VM is adopted (its timeout counts from its real start), a stopped one is
collected into a result from its console, and a job whose VM is gone is handed back to
the broker as its next attempt (up to MAX_ATTEMPTS). A job's VM is the one the journal
names: its own `job-<uuid>`, or the warm pool VM it took, which is that job's VM from the
moment it was journaled (one whose hand-off had not happened is destroyed and the job
handed back). VMs tagged as ours that no live job names (idle pool VMs among them) are
destroyed with their overlay and seed; then each backend removes what it left behind for
VMs that are not live (`Hypervisor.leftovers`). Nothing untagged is touched: other VMs,
and files not named `job-<uuid>.*` or `pool-<uuid>.*`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from hypervisors.base import BackendError, VmInfo, VmSpec, VmState
from hypervisors.router import RouterHypervisor
from hypervisors.statedir import vm_name_for
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import ImageMap, RequestRejected
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import JobResult, JobStatus
from orchestrator.host.capacity import CapacityLedger
from orchestrator.host.intake import AcceptedJob
from orchestrator.host.journal import LIVE_STATES, JobRecord, JobState, Journal
from orchestrator.host.outbox import ResultOutbox
from orchestrator.host.runner import JobRunner

log = EventLogger("orchestrator.host.reconcile")


@dataclass
class Reconciliation:
    adopted: list[str] = field(default_factory=list)  # handed to the runner (watch, collect or hand back)
    answered: list[str] = field(default_factory=list)  # could not be resumed: error result
    destroyed_vms: list[str] = field(default_factory=list)
    removed_leftovers: list[str] = field(default_factory=list)


async def reconcile(
    *,
    settings: DaemonSettings,
    image_map: ImageMap,
    journal: Journal,
    router: RouterHypervisor,
    runner: JobRunner,
    ledger: CapacityLedger,
    outbox: ResultOutbox,
) -> Reconciliation:
    report = Reconciliation()
    live = {record.job_id: record for record in await journal.in_states(LIVE_STATES)}
    # A job's VM is the one the journal names: its own, or the pool VM it took.
    live_vms = {_vm_of(record): record for record in live.values()}
    vms = await router.list_ours()
    running_vms = {vm.name for vm in vms if vm.state is VmState.RUNNING}
    for vm_name, record in live_vms.items():
        await _resume(record, vm_name, vm_name in running_vms, settings, image_map, runner, ledger, outbox, report)
    for vm in vms:
        if vm.name not in live_vms:  # idle pool VMs too: the pools boot fresh ones
            await _destroy_orphan(vm, settings, router, journal, report)
    report.removed_leftovers = await router.leftovers(set(live_vms))
    log.info(
        "reconcile.done",
        host=settings.host_name,
        adopted=len(report.adopted),
        answered=len(report.answered),
        destroyed_vms=len(report.destroyed_vms),
        removed_leftovers=len(report.removed_leftovers),
    )
    return report


def _vm_of(record: JobRecord) -> str:
    return record.vm_name or vm_name_for(record.job_id)


async def _resume(
    record: JobRecord,
    vm_name: str,
    vm_running: bool,
    settings: DaemonSettings,
    image_map: ImageMap,
    runner: JobRunner,
    ledger: CapacityLedger,
    outbox: ResultOutbox,
    report: Reconciliation,
) -> None:
    request, label = record.request, record.label
    if request is None or record.nonce is None:
        return  # live rows always have both; nothing to resume otherwise
    try:
        if label is None or label not in image_map.images:
            raise RequestRejected(f"label {label!r} is no longer in the image map")
        resources = image_map.resources_for(label, request)
    except RequestRejected as exc:
        result = JobResult.for_request(
            request,
            status=JobStatus.ERROR,
            host=settings.host_name,
            label=label,
            summary=f"could not resume after a restart: {exc}",
        )
        await outbox.deliver(result, stored=False)
        report.answered.append(record.job_id)
        return
    # An adopted job holds capacity whatever the limits now say: its VM exists.
    reservation = ledger.force_reserve(record.job_id, label, resources.cpus, resources.memory_mb)
    job = AcceptedJob(
        request,
        label,
        image_map.images[label],
        resources,
        reservation,
        record.nonce,
        vm_name,
        accepted_at=record.accepted_at or time.time(),
    )
    runner.start(
        job,
        adopted_started_at=record.started_at or record.accepted_at or 0.0,
        vm_running=vm_running,
        handed_over=record.state is JobState.RUNNING,
    )
    report.adopted.append(record.job_id)


async def _destroy_orphan(
    vm: VmInfo, settings: DaemonSettings, router: RouterHypervisor, journal: Journal, report: Reconciliation
) -> None:
    known = await journal.get(vm.job_id) if vm.job_id else None
    spec = VmSpec(
        name=vm.name,
        job_id=vm.job_id,
        image_path=None,
        image_format=None,
        cpus=1,
        memory_mb=64,
        disk_gb=None,
        console_path=vm.console_path or settings.state.console(vm.job_id or vm.name),
    )
    try:
        await router.backend_for(vm.backend).destroy(spec)
    except BackendError as exc:
        log.error("reconcile.destroy_failed", vm=vm.name, job_id=vm.job_id, error=str(exc))
        return
    if known is None:  # no job of ours ever had it: its console is nobody's log
        await asyncio.to_thread(spec.console_path.unlink, missing_ok=True)
    report.destroyed_vms.append(vm.name)
    log.info("reconcile.destroyed_orphan_vm", vm=vm.name, job_id=vm.job_id)
