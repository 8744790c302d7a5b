"""What operators see of a job (`GET /jobs`, `GET /jobs/<id>`, `orchestrator jobs`), made
from its journal row. Nothing that may be secret leaves this way: a request shows its env
names, never their values, and whether it has a script, never the script."""

from __future__ import annotations

from datetime import UTC, datetime

from hypervisors.statedir import is_pool_vm
from orchestrator.core.messages import JobDetail, JobSummary, RequestView
from orchestrator.host.journal import JobRecord


def _when(timestamp: float | None) -> datetime | None:
    return datetime.fromtimestamp(timestamp, UTC) if timestamp is not None else None


def summary_of(record: JobRecord, *, host: str) -> JobSummary:
    result = record.result
    return JobSummary(
        job_id=record.job_id,
        host=host,
        label=record.label,
        state=record.state.value,
        attempt=record.attempt,
        accepted_at=_when(record.accepted_at),
        started_at=_when(record.started_at),
        finished_at=_when(record.finished_at),
        status=result.status if result is not None else None,
        summary=result.summary if result is not None else None,
        vm=record.vm_name,
        warm=record.vm_name is not None and is_pool_vm(record.vm_name),
    )


def detail_of(record: JobRecord, *, host: str) -> JobDetail:
    request = record.request
    shown = None
    if request is not None:
        shown = RequestView(
            repo_url=request.repo_url,
            commit_sha=request.commit_sha,
            runs_on=request.runs_on,
            script_path=request.script_path,
            has_script=request.script is not None,
            env_names=sorted(request.env),
            timeout_s=request.timeout_s,
            size=request.size,
            cpus=request.cpus,
            memory_mb=request.memory_mb,
            disk_gb=request.disk_gb,
        )
    result = record.result
    return JobDetail(
        **summary_of(record, host=host).model_dump(),
        request=shown,
        result=result,
        timings=dict(result.timings) if result is not None else {},
    )
