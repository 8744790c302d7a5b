"""What the bridge shows on a commit for each step of a job, the same on every forge
(each forge maps `StatusState` onto its own states and cuts the description to its
limit). Context: `orchestrator/<job name>`; `orchestrator` for the jobs file itself."""

from __future__ import annotations

from orchestrator.core.messages import JobResult, JobStatus
from orchestrator.forge.base import CommitStatus, StatusState

CONTEXT_PREFIX = "orchestrator"


def context_for(job_name: str) -> str:
    return f"{CONTEXT_PREFIX}/{job_name}"


def queued(context: str, *, caught_up: bool = False) -> CommitStatus:
    return CommitStatus(StatusState.PENDING, context, "queued (caught up)" if caught_up else "queued")


def running(context: str, host: str, log_url: str | None) -> CommitStatus:
    return CommitStatus(StatusState.RUNNING, context, f"running on {host}", log_url)


def superseded(context: str, new_sha: str) -> CommitStatus:
    return CommitStatus(StatusState.ERROR, context, f"superseded by {new_sha[:12]}")


def jobs_file_error(message: str) -> CommitStatus:
    return CommitStatus(StatusState.ERROR, CONTEXT_PREFIX, message)


_FINAL = {
    JobStatus.SUCCEEDED: StatusState.SUCCESS,
    JobStatus.FAILED: StatusState.FAILURE,
    JobStatus.TIMEOUT: StatusState.ERROR,
    JobStatus.CANCELLED: StatusState.CANCELED,
    JobStatus.ERROR: StatusState.ERROR,
}


def finished(context: str, result: JobResult) -> CommitStatus:
    run_s = result.timings.get("run_s")
    took = f" in {run_s:.0f} s" if run_s is not None else ""
    where = f" on {result.host}" if result.host else ""
    text = {
        JobStatus.SUCCEEDED: f"succeeded{took}{where}",
        JobStatus.FAILED: f"failed with exit code {result.exit_code}{took}{where}",
        JobStatus.TIMEOUT: f"timed out{where}: {result.summary}",
        JobStatus.CANCELLED: f"cancelled{where}",
        JobStatus.ERROR: f"error{where}: {result.summary}",
    }[result.status]
    return CommitStatus(_FINAL[result.status], context, text, result.log_url)
