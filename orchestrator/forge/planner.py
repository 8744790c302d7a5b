"""From a forge event to the jobs it asks for: the jobs file at the exact commit, its
`on:` filters, the fork and secret rules, and one `jobrequest.v1` per job.

Request ids are `uuid5` of what identifies the work — forge, repository, ref (branch,
tag or pull request), commit and job name — so the same commit on the same ref is one
run however often its event arrives (webhook, redelivery, catch-up). An explicit
re-run adds its number.
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError

from orchestrator.core.messages import JobRequest
from orchestrator.core.requestbody import describe_validation_error
from orchestrator.forge.base import CommitStatus, EventKind, Forge, ForgeEvent
from orchestrator.forge.config import RepositoryEntry
from orchestrator.forge.jobsfile import JobsFile, JobsFileError, JobSpec, parse_jobs_file
from orchestrator.forge.journal import Run
from orchestrator.forge.status import context_for, jobs_file_error

# Fixed forever: request ids of runs already published depend on it.
REQUEST_NAMESPACE = uuid.UUID("5f1c0a52-9c36-4d8e-a51b-6e3d5d2b7c11")
FALLBACK_JOB = "ci"

_EVENT = TypeAdapter(ForgeEvent)


def event_to_json(event: ForgeEvent) -> dict[str, Any]:
    return _EVENT.dump_python(event, mode="json")


def event_from_json(data: dict[str, Any]) -> ForgeEvent:
    return _EVENT.validate_python(data)


def request_id_for(forge: str, repo: str, ref_key: str, commit_sha: str, job_name: str, *, rerun: int = 0) -> uuid.UUID:
    name = f"{forge}/{repo}/{ref_key}/{commit_sha}/{job_name}" + (f"/rerun-{rerun}" if rerun else "")
    return uuid.uuid5(REQUEST_NAMESPACE, name)


@dataclass
class Plan:
    runs: list[Run] = field(default_factory=list)
    statuses: list[CommitStatus] = field(default_factory=list)  # errors to show at once
    note: str = ""  # why nothing runs, for the log


@functools.lru_cache(maxsize=256)
def _parsed(text: bytes, filename: str) -> JobsFile:
    """Most commits of a repository share their jobs file: parse each text once."""
    return parse_jobs_file(text, filename=filename)


def _may_use_secrets(event: ForgeEvent) -> bool:
    """Pushes and pull requests from the same repository; never a fork's code."""
    return not event.from_fork


async def plan_event(
    event: ForgeEvent,
    *,
    forge_name: str,
    forge: Forge,
    repo: RepositoryEntry,
    secrets: dict[str, str],
    rerun: int = 0,
    only_job: str | None = None,
) -> Plan:
    """The runs `event` asks for. Raises `ForgeApiError` when the jobs file cannot be
    read now (the caller tries again later)."""
    if event.from_fork and not repo.forks:
        return Plan(note="pull requests from forks do not run for this repository (forks: false)")
    text = await forge.read_file(event.repo, repo.jobs_file, event.commit_sha)
    if text is None:
        if repo.fallback is None:
            return Plan(note=f"no {repo.jobs_file} at {event.commit_sha} and no fallback")
        jobs = {FALLBACK_JOB: JobSpec(runs_on=repo.fallback.runs_on, script_path=repo.fallback.script_path)}
    else:
        try:
            jobs = _parsed(text, repo.jobs_file).matching(event)
        except JobsFileError as exc:
            return Plan(statuses=[jobs_file_error(str(exc))], note=f"invalid jobs file: {exc}")
    if only_job is not None:
        jobs = {name: job for name, job in jobs.items() if name == only_job}
    plan = Plan(note="" if jobs else "no job matches this event")
    extra_env = secrets if _may_use_secrets(event) else {}
    for name, job in sorted(jobs.items()):
        request_id = request_id_for(
            forge_name, event.repo.full_name, event.ref_key, event.commit_sha, name, rerun=rerun
        )
        try:
            request = _request(event, forge_name, repo, name, job, request_id, extra_env)
        except ValidationError as exc:
            plan.statuses.append(jobs_file_error(f"{repo.jobs_file}: jobs.{name}: {describe_validation_error(exc)}"))
            continue
        plan.runs.append(
            Run(
                request_id=str(request_id),
                forge=forge_name,
                repo=event.repo,
                commit_sha=event.commit_sha,
                ref_key=event.ref_key,
                job_name=name,
                context=context_for(name),
                request=request.model_dump_json(),
                published=False,
            )
        )
    return plan


def _request(
    event: ForgeEvent,
    forge_name: str,
    repo: RepositoryEntry,
    name: str,
    job: JobSpec,
    request_id: uuid.UUID,
    secrets: dict[str, str],
) -> JobRequest:
    return JobRequest.model_validate(
        {
            "request_id": request_id,
            "source": forge_name,
            # A pull request's commits live in its head repository (a fork's, for a fork PR).
            "repo_url": event.head_clone_url
            if event.kind is EventKind.PULL_REQUEST and event.head_clone_url
            else event.repo.clone_url,
            "commit_sha": event.commit_sha,
            "runs_on": job.runs_on,
            "workflow_path": repo.jobs_file,
            "workflow_job_id": name,
            "repo_owner": event.repo.owner,
            "repo_name": event.repo.name,
            "script": job.script,
            "script_path": job.script_path,
            "env": {**job.env, **secrets},  # a job cannot shadow a secret's name
            "size": job.size,
            "cpus": job.cpus,
            "memory_mb": job.memory_mb,
            "disk_gb": job.disk_gb,
            "timeout_s": job.timeout_s,
        }
    )
