"""Wire contracts: every message that crosses RabbitMQ is one of these pydantic models.

Field names follow the reference system's `jobrequest.v1` / `jobresult.v1`, so existing
forge integrations keep working; fields we add are optional. Unknown fields are ignored,
known fields are validated strictly: nothing from a message reaches a shell, XML or a
path without passing these checks first.
"""

from __future__ import annotations

import enum
import re
import uuid
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
MAX_SCRIPT_BYTES = 256 * 1024
MAX_ENV_NAME_BYTES = 128  # ENV_NAME_PATTERN: ASCII only, at most 128 characters
MAX_ENV_VALUE_BYTES = 32 * 1024
MAX_ENV_ENTRIES = 256
MAX_TIMEOUT_S = 7 * 24 * 3600
# Default of the MAX_MESSAGE_BYTES setting (a body over it is refused unparsed): the
# largest valid request however its publisher's JSON encoder wrote it. That is the script
# and every env name and value at their limits with each UTF-8 byte as a six-byte escape
# (`\u0001`; no character's escape is more than six times its UTF-8 size), plus 1 MiB
# for the other fields and the unknown fields a forge may add: about 51 MiB.
MAX_MESSAGE_BYTES = 6 * (MAX_SCRIPT_BYTES + MAX_ENV_ENTRIES * (MAX_ENV_NAME_BYTES + MAX_ENV_VALUE_BYTES)) + 1024 * 1024

Label = Annotated[str, StringConstraints(pattern=LABEL_PATTERN)]
# Resource bounds, shared by job requests and the image map.
Cpus = Annotated[int, Field(ge=1, le=512)]
MemoryMb = Annotated[int, Field(ge=64, le=4 * 1024 * 1024)]
DiskGb = Annotated[int, Field(ge=1, le=64 * 1024)]
TimeoutS = Annotated[int, Field(ge=1, le=MAX_TIMEOUT_S)]
ShortText = Annotated[str, StringConstraints(max_length=512)]


def _no_control_chars(value: str) -> str:
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("must not contain control characters")
    return value


def _utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:59:59-14:00 is in year 10000 in UTC
        raise PydanticCustomError(
            "datetime_out_of_range",
            "out of range: {value} is outside 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z in UTC",
            {"value": value.isoformat()},
        ) from None


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


def utf8_bytes_at_most(limit: int) -> AfterValidator:
    """A text limit in UTF-8 bytes, the size it takes in the VM's seed and environment
    (a character count would let 256 Ki three-byte characters be 768 KiB)."""

    def check(value: str) -> str:
        try:
            size = len(value.encode())
        except UnicodeEncodeError as exc:  # a lone surrogate, from a `\ud800` escape
            raise PydanticCustomError(
                "not_utf8", "not UTF-8 text: a lone surrogate at character {at}", {"at": exc.start}
            ) from None
        if size > limit:
            raise PydanticCustomError(
                "too_many_bytes",
                "is {size} bytes as UTF-8, over the limit of {limit} bytes",
                {"size": size, "limit": limit},
            )
        return value

    return AfterValidator(check)


SafeText = Annotated[ShortText, AfterValidator(_no_control_chars)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]
Script = Annotated[str, AfterValidator(_no_nul), utf8_bytes_at_most(MAX_SCRIPT_BYTES)]
EnvValue = Annotated[str, AfterValidator(_no_nul), utf8_bytes_at_most(MAX_ENV_VALUE_BYTES)]

_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[A-Za-z0-9._/~-]+$")
_REPO_SCHEMES = ("https://", "http://", "ssh://", "git://", "file://")


def now_utc() -> datetime:
    return datetime.now(UTC)


def message_id_for(job_id: str, attempt: int) -> str:
    """`<job id>/<attempt>`: the AMQP message id of a job's request and of its result.
    Delivery is at least once; a consumer drops a copy it has seen by this id."""
    return f"{job_id}/{attempt}"


class JobStatus(str, enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    ERROR = "error"


class JobRequest(BaseModel):
    """`jobrequest.v1`: what a forge (or `orchestrator enqueue`) asks a host to run."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: Literal["jobrequest.v1"] = "jobrequest.v1"
    request_id: uuid.UUID
    source: SafeText | None = None
    repo_url: Annotated[str, StringConstraints(min_length=1, max_length=2048)]
    commit_sha: Annotated[str, StringConstraints(pattern=r"^([0-9a-fA-F]{40}|[0-9a-fA-F]{64})$")]
    runs_on: Label | None = None
    workflow_path: SafeText | None = None
    workflow_job_id: SafeText | None = None
    repo_owner: SafeText | None = None
    repo_name: SafeText | None = None
    script_path: SafeText | None = None
    submitted_at: UtcDatetime = Field(default_factory=now_utc)
    # ours
    script: Script | None = None
    env: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)], EnvValue] = Field(
        default_factory=dict, max_length=MAX_ENV_ENTRIES
    )
    size: Label | None = None
    cpus: Cpus | None = None
    memory_mb: MemoryMb | None = None
    disk_gb: DiskGb | None = None
    timeout_s: TimeoutS | None = None
    deadline: UtcDatetime | None = None
    attempt: Annotated[int, Field(ge=1, le=100)] = 1

    @field_validator("repo_url")
    @classmethod
    def _repo_url(cls, value: str) -> str:
        _no_control_chars(value)
        if " " in value or value.startswith("-"):
            raise ValueError("must not contain spaces or start with '-'")
        if not (value.startswith(_REPO_SCHEMES) or _SCP_LIKE.match(value)):
            raise ValueError("must be an https://, http://, ssh://, git:// or file:// URL, or user@host:path")
        return value

    @field_validator("commit_sha")
    @classmethod
    def _lower_sha(cls, value: str) -> str:
        return value.lower()

    @property
    def job_id(self) -> str:
        return str(self.request_id)

    def fields_differing_from(self, other: JobRequest) -> list[str]:
        """The fields in which `other` asks for a different job than this request. Not
        `attempt` (a hand-back raises it) nor `submitted_at` (a publisher may leave it
        out, and then it is the time of parsing)."""
        return [
            name
            for name in type(self).model_fields
            if name not in _NOT_THE_JOB and getattr(self, name) != getattr(other, name)
        ]


_NOT_THE_JOB = frozenset({"attempt", "submitted_at"})


class JobResult(BaseModel):
    """`jobresult.v1`: the one answer a host publishes for each job it took."""

    model_config = ConfigDict(extra="ignore")

    schema_version: Literal["jobresult.v1"] = "jobresult.v1"
    request_id: uuid.UUID
    repo_url: str | None = None
    repo_owner: str | None = None
    repo_name: str | None = None
    commit_sha: str | None = None
    success: bool
    exit_code: int | None = None
    summary: str
    completed_at: UtcDatetime = Field(default_factory=now_utc)
    # ours
    status: JobStatus
    host: str | None = None
    label: str | None = None
    attempt: int = 1
    started_at: UtcDatetime | None = None
    log_url: str | None = None
    console_tail: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)

    @classmethod
    def for_request(
        cls,
        request: JobRequest | None,
        *,
        request_id: uuid.UUID | None = None,
        status: JobStatus,
        summary: str,
        **fields: object,
    ) -> JobResult:
        """A result that echoes the request's identity fields, as forge integrations expect."""
        identity: dict[str, object] = {}
        if request is not None:
            identity = {
                "request_id": request.request_id,
                "repo_url": request.repo_url,
                "repo_owner": request.repo_owner,
                "repo_name": request.repo_name,
                "commit_sha": request.commit_sha,
                "attempt": request.attempt,
            }
        elif request_id is not None:
            identity = {"request_id": request_id}
        return cls(
            **identity,
            status=status,
            success=status is JobStatus.SUCCEEDED,
            summary=summary,
            **fields,
        )


class EventKind(str, enum.Enum):
    ACCEPTED = "accepted"
    STARTED = "started"
    FINISHED = "finished"
    REQUEUED = "requeued"


class JobEvent(BaseModel):
    """A lifecycle event on `<prefix>.events` (routing key `job.<kind>.<label>`)."""

    model_config = ConfigDict(extra="ignore")

    kind: EventKind
    request_id: uuid.UUID
    host: str
    label: str | None = None
    status: JobStatus | None = None
    log_url: str | None = None  # the job's live log on its host (PUBLIC_URL set)
    at: UtcDatetime = Field(default_factory=now_utc)


class Heartbeat(BaseModel):
    """A host's periodic self-description on `<prefix>.events` (`host.heartbeat.<host>`)."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["heartbeat"] = "heartbeat"
    host: str
    version: str
    labels: list[str]
    max_concurrency: int
    running: int
    running_by_label: dict[str, int]
    cpus_used: int
    cpus_total: int
    memory_mb_used: int
    memory_mb_total: int
    # `host:port` of the broker node the host is connected to (one of AMQP_URL's);
    # None while it reconnects.
    broker_node: str | None = None
    draining: bool = False
    # Warm pool VMs no job has taken (their vCPUs and memory are in the *_used above).
    warm: int = 0
    warm_by_label: dict[str, int] = Field(default_factory=dict)
    # The host's PUBLIC_URL: where the dashboard of another host reads its job logs.
    public_url: str | None = None
    at: UtcDatetime = Field(default_factory=now_utc)


class ControlKind(str, enum.Enum):
    CANCEL = "cancel"
    DESCRIBE = "describe"  # every host answers with its heartbeat (`orchestrator hosts`)
    DRAIN = "drain"  # the hosts named stop taking work (answer: heartbeat)
    RESUME = "resume"  # ... and take work again (answer: heartbeat)
    JOBS = "jobs"  # every host answers with its jobs (`JobsReply`, `orchestrator jobs`)
    LOCATE = "locate"  # the host that has the job answers (`JobLocation`, `orchestrator logs`)
    HOLDER = "holder"  # every host answers what its journal has of the job (`JobHolding`)


JobStateName = Literal["accepted", "running", "finished", "published", "requeued", "superseded"]


class JobsQuery(BaseModel):
    """Which jobs to list (`GET /jobs`, `orchestrator jobs`): newest first."""

    model_config = ConfigDict(extra="forbid")

    state: JobStateName | None = None
    label: Label | None = None
    since: UtcDatetime | None = None  # accepted at or after
    limit: Annotated[int, Field(ge=1, le=1000)] = 100


class ControlMessage(BaseModel):
    """On `<prefix>.control` (fanout): every host gets it."""

    model_config = ConfigDict(extra="ignore")

    kind: ControlKind
    request_id: uuid.UUID | None = None  # the job, for cancel and locate
    hosts: list[str] | None = None  # drain/resume/jobs: only these hosts (None: all)
    jobs: JobsQuery | None = None  # for jobs
    at: UtcDatetime = Field(default_factory=now_utc)

    def for_host(self, host: str) -> bool:
        return self.hosts is None or host in self.hosts


class JobSummary(BaseModel):
    """One job as operators see it (`GET /jobs`, `orchestrator jobs`)."""

    model_config = ConfigDict(extra="ignore")

    job_id: uuid.UUID
    host: str
    label: str | None
    state: JobStateName
    attempt: int
    accepted_at: UtcDatetime | None
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    status: JobStatus | None
    summary: str | None
    vm: str | None
    warm: bool


class RequestView(BaseModel):
    """What a job asked for, without what may be secret (env values, the script)."""

    repo_url: str
    commit_sha: str
    runs_on: str | None
    script_path: str | None
    has_script: bool
    env_names: list[str]
    timeout_s: int | None
    size: str | None
    cpus: int | None
    memory_mb: int | None
    disk_gb: int | None


class JobDetail(JobSummary):
    """`GET /jobs/<id>`: the summary, the request as `RequestView`, the result."""

    request: RequestView | None
    result: JobResult | None
    timings: dict[str, float]


class JobsReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    host: str
    jobs: list[JobSummary]


class JobLocation(BaseModel):
    """A host's answer to `locate`: it has (or had) the job; where its log is."""

    model_config = ConfigDict(extra="ignore")

    request_id: uuid.UUID
    host: str
    running: bool
    log_url: str | None  # None without PUBLIC_URL on that host


class JobHolding(BaseModel):
    """A host's answer to `holder`: the attempt of the job its journal has, and its state
    there; `checking` while the host asks the fleet itself before taking a redelivery.

    Asked before a host runs a redelivered request it does not know (its first taker's
    ack may have been lost with a broker node) and before a host hands a job back as
    its next attempt (a redelivery of it may already run elsewhere): a holding of the
    same or a later attempt means the job is another host's."""

    model_config = ConfigDict(extra="ignore")

    request_id: uuid.UUID
    host: str
    attempt: Annotated[int, Field(ge=1)]
    state: JobStateName | Literal["checking"]


class CancelOutcome(str, enum.Enum):
    CANCELLING = "cancelling"  # it runs here: its VM is being destroyed
    FINISHED = "finished"  # it already has its result here
    UNKNOWN = "unknown"  # not here (it may be queued: it will be dropped when taken)


class CancelReply(BaseModel):
    model_config = ConfigDict(extra="ignore")

    request_id: uuid.UUID
    host: str
    outcome: CancelOutcome
    status: JobStatus | None = None
