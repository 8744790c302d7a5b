"""A repository's jobs file (default `.orchestrator.yaml`): what to run for a commit.

```yaml
jobs:
  test:                        # the job's name; commit status context "orchestrator/test"
    runs_on: ubuntu-22.04      # optional: the fleet's default label otherwise
    size: small                # optional preset, or cpus / memory_mb / disk_gb
    timeout_s: 1800
    env: {GREETING: hello}
    script: |
      make test
    on: {events: [push, pull_request], branches: [main, "release/*"]}   # optional filter
```

It is written by the repository's authors, so it is untrusted input: parsed with the
bounded YAML loader, validated with pydantic, every error reported as `file:line:
key.path: what` (shown on the commit as an `error` status).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from orchestrator.core.messages import (
    ENV_NAME_PATTERN,
    LABEL_PATTERN,
    MAX_ENV_ENTRIES,
    Cpus,
    DiskGb,
    MemoryMb,
    TimeoutS,
)
from orchestrator.core.yamlfile import YamlError, parse_yaml
from orchestrator.forge.base import EventKind, ForgeEvent

JOBS_FILE_MAX_BYTES = 256 * 1024 + 64 * 1024  # a script of the largest size, and the rest
JOB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MAX_JOBS = 64


class JobsFileError(Exception):
    """The jobs file cannot be used; the message is `file:line: key.path: what`."""


class Trigger(BaseModel):
    """`on:` — which events and branches run the job (all, when absent)."""

    model_config = ConfigDict(extra="forbid")

    events: list[EventKind] | None = None
    branches: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] | None = None
    tags: list[Annotated[str, StringConstraints(min_length=1, max_length=255)]] | None = None

    def matches(self, event: ForgeEvent) -> bool:
        if self.events is not None and event.kind not in self.events:
            return False
        if event.tag is not None:
            # With a branch filter and no tag filter, a job is for branches only.
            if self.tags is None:
                return self.branches is None
            return any(fnmatch.fnmatchcase(event.tag, p) for p in self.tags)
        if self.branches is not None:
            # A pull request is filtered by the branch it targets.
            return event.branch is not None and any(fnmatch.fnmatchcase(event.branch, p) for p in self.branches)
        # The mirror of the tag rule above: with a tag filter and no branch filter, a job
        # is for tags only, not for every branch push and pull request.
        return self.tags is None


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    runs_on: Annotated[str, StringConstraints(pattern=LABEL_PATTERN)] | None = None
    size: Annotated[str, StringConstraints(pattern=LABEL_PATTERN)] | None = None
    cpus: Cpus | None = None
    memory_mb: MemoryMb | None = None
    disk_gb: DiskGb | None = None
    timeout_s: TimeoutS | None = None
    env: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)], str] = Field(
        default_factory=dict, max_length=MAX_ENV_ENTRIES
    )
    script: Annotated[str, StringConstraints(min_length=1)] | None = None
    script_path: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None
    on: Trigger = Field(default_factory=Trigger)


class JobsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: dict[Annotated[str, StringConstraints(pattern=JOB_NAME_PATTERN)], JobSpec] = Field(
        min_length=1, max_length=MAX_JOBS
    )

    def matching(self, event: ForgeEvent) -> dict[str, JobSpec]:
        return {name: job for name, job in self.jobs.items() if job.on.matches(event)}


def _describe(error: Mapping[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key"
    if error["type"] == "missing":
        return "required key is missing"
    return str(error["msg"])


def parse_jobs_file(text: bytes, *, filename: str) -> JobsFile:
    """Validate a jobs file; `JobsFileError` naming the line and key of the first problem
    (a commit status has room for one)."""
    try:
        document = parse_yaml(text, filename=filename, max_bytes=JOBS_FILE_MAX_BYTES)
    except YamlError as exc:
        raise JobsFileError(str(exc)) from None
    if not isinstance(document.data, dict):
        raise JobsFileError(f"{filename}:1: a jobs file is a mapping with a `jobs` key")
    try:
        jobs_file = JobsFile.model_validate(document.data)
    except ValidationError as exc:
        first = exc.errors()[0]
        path = tuple(first["loc"])
        dotted = ".".join(str(p) for p in path) or "(top level)"
        raise JobsFileError(f"{document.where(path)}: {dotted}: {_describe(first)}") from None
    for name, job in jobs_file.jobs.items():
        if (job.script is None) == (job.script_path is None):
            raise JobsFileError(
                f"{document.where(('jobs', name))}: jobs.{name}: give exactly one of script and script_path"
            )
    return jobs_file
