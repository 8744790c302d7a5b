"""One interface for every forge: what the bridge needs from GitHub, Forgejo/Gitea and
GitLab, and the forge-neutral event and status model it works with.

Intake (`receiver`) and reporting (`reporter`) never branch on a forge's name: each forge
is one module (`github`, `forgejo`, `gitlab`) implementing `Forge`, which turns a webhook
into a `ForgeEvent` (parse) and talks to that forge's REST API (files, statuses, branch
heads and open pull requests for catch-up). Status texts are shared (`status`).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from orchestrator.forge.http import ApiClient

ZERO_SHA = "0" * 40


class ForgeKind(str, enum.Enum):
    GITHUB = "github"
    FORGEJO = "forgejo"  # also Gitea: same API and payloads, `X-Gitea-*` headers
    GITLAB = "gitlab"


class EventKind(str, enum.Enum):
    PUSH = "push"
    PULL_REQUEST = "pull_request"  # GitLab: merge request


class StatusState(str, enum.Enum):
    """The bridge's own states; each forge maps them onto what its API offers."""

    PENDING = "pending"  # queued
    RUNNING = "running"  # started on a host
    SUCCESS = "success"
    FAILURE = "failure"  # the job's script failed
    ERROR = "error"  # timeout, infrastructure error, superseded
    CANCELED = "canceled"

    @property
    def final(self) -> bool:
        return self not in (StatusState.PENDING, StatusState.RUNNING)


@dataclass(frozen=True)
class Repo:
    """A repository as a forge names it. `project_id` is GitLab's numeric id (the other
    forges address a repository by owner and name)."""

    owner: str
    name: str
    clone_url: str
    project_id: int | None = None

    @property
    def full_name(self) -> str:
        return f"{self.owner}/{self.name}"


@dataclass(frozen=True)
class ForgeEvent:
    """A push (to a branch or a tag) or a pull/merge request's new head, forge-neutral."""

    kind: EventKind
    repo: Repo  # the repository the webhook is configured on (a PR's base repository)
    commit_sha: str
    branch: str | None  # push: the branch pushed to; PR: the base (target) branch
    tag: str | None = None  # push of a tag
    pull_number: int | None = None  # PR number (GitLab: the MR's iid)
    head_branch: str | None = None  # PR: the branch it comes from
    head_clone_url: str | None = None  # PR: where its commits live (a fork's URL for a fork PR)
    from_fork: bool = False
    delivery_id: str = ""
    sender: str | None = None

    @property
    def ref_key(self) -> str:
        """What identifies the work besides the commit: `branch/<name>`, `tag/<name>` or
        `pull/<n>` (one run per commit and ref, however the event arrives)."""
        if self.pull_number is not None:
            return f"pull/{self.pull_number}"
        return f"tag/{self.tag}" if self.tag is not None else f"branch/{self.branch}"


@dataclass(frozen=True)
class Ping:
    """A test delivery (GitHub `ping`, Forgejo/GitLab test hooks): answered 200."""


@dataclass(frozen=True)
class Ignored:
    """A delivery the bridge acknowledges and does nothing with (204): other events,
    closed pull requests, branch deletions (`after` all zeros), label changes..."""

    reason: str


WebhookOutcome = ForgeEvent | Ping | Ignored


class WebhookError(Exception):
    """A delivery that cannot be read (400): the message says what is wrong."""


@dataclass(frozen=True)
class CommitStatus:
    state: StatusState
    context: str  # e.g. "orchestrator/test"
    description: str  # shortened by each forge to its limit
    target_url: str | None = None


@dataclass(frozen=True)
class BranchHead:
    name: str
    commit_sha: str


@dataclass(frozen=True)
class PullHead:
    number: int
    commit_sha: str
    base_branch: str
    head_branch: str
    head_clone_url: str
    from_fork: bool


class Forge(Protocol):
    """One forge instance (its API base URL and token). Webhook methods are pure; API
    methods are async and raise `ForgeApiError`."""

    kind: ForgeKind
    api: ApiClient  # its HTTP client (catch-up bounds its calls per repository)

    def delivery_id(self, headers: Mapping[str, str]) -> str | None:
        """The delivery's id (`X-GitHub-Delivery`, `X-Forgejo-Delivery`/`X-Gitea-Delivery`,
        `X-Gitlab-Event-UUID`), or None when the headers carry none."""

    def repository_of(self, body: bytes) -> str | None:
        """`owner/name` of the repository a delivery is about, read before it is
        authenticated (per-repository secrets decide how to authenticate it). None when
        the body names none. Raises `WebhookError` for a body that is not JSON."""

    def authentic(self, headers: Mapping[str, str], body: bytes, secrets: list[str]) -> bool:
        """Whether the delivery was signed with one of `secrets` (HMAC-SHA256 of the body
        for GitHub and Forgejo/Gitea, the `X-Gitlab-Token` for GitLab); constant-time."""

    def parse(self, headers: Mapping[str, str], body: bytes) -> WebhookOutcome:
        """The delivery as an event, a ping, or ignored. Raises `WebhookError`."""

    async def repository(self, full_name: str) -> Repo:
        """The repository named `owner/name` (GitLab: the project's path with its
        namespace, subgroups included) as the forge knows it: its canonical owner and
        name, its clone URL and, on GitLab, its numeric project id. For a repository no
        webhook has described yet. A repository that does not exist or that the token
        cannot see is a `ForgeApiError` with status 404 and no `retry_after_s`."""

    async def read_file(self, repo: Repo, path: str, commit_sha: str) -> bytes | None:
        """The file at `path` at the exact commit, or None when it does not exist there."""

    async def set_status(self, repo: Repo, commit_sha: str, status: CommitStatus) -> None:
        """Set the commit status for `status.context` on `commit_sha`."""

    async def branches(self, repo: Repo) -> list[BranchHead]:
        """Every branch and its head, following pagination to the end."""

    async def open_pulls(self, repo: Repo) -> list[PullHead]:
        """Every open pull/merge request and its head, following pagination to the end."""

    async def close(self) -> None:
        """Release the HTTP session."""
