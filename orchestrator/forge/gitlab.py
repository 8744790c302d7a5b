"""GitLab (REST API v4 and project/group webhooks) as a `Forge`.

Two halves that share only the event model:

- Webhooks (pure): `X-Gitlab-Token` against the configured secrets, then the payload into
  a `ForgeEvent`, a `Ping` or `Ignored`. Pushes to a branch or a tag, and merge requests
  that are opened, reopened, or updated with new commits (`object_attributes.oldrev`)
  become events; everything else is acknowledged and dropped.
- REST API v4 through the shared `ApiClient` (`PRIVATE-TOKEN`): the jobs file at a commit,
  commit statuses, branches, open merge requests and the project's webhooks for catch-up.

Payload shapes and API contracts follow GitLab's documentation ("Webhook events",
"Webhooks", "Commits API", "Repository files API", "Branches API", "Merge requests API",
"Project webhooks API"); tests/fixtures/forge/gitlab/README.md names the pages.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from orchestrator.core.logsetup import EventLogger
from orchestrator.forge.base import (
    BranchHead,
    CommitStatus,
    EventKind,
    ForgeEvent,
    ForgeKind,
    Ignored,
    Ping,
    PullHead,
    Repo,
    StatusState,
    WebhookError,
    WebhookOutcome,
)
from orchestrator.forge.http import DEFAULT_RETRY_S, ApiClient, ForgeApiError

log = EventLogger("orchestrator.forge.gitlab")

# `ref`, `target_url` and `description` of a commit status: "Must be 255 characters or
# fewer" (Commits API); GitLab answers 400 with a validation error above that.
STATUS_TEXT_LIMIT = 255

# The bridge's states onto GitLab's (`pending`, `running`, `success`, `failed`,
# `canceled`, `skipped`). GitLab has no "error": an infrastructure error is a failure.
GITLAB_STATES: dict[StatusState, str] = {
    StatusState.PENDING: "pending",
    StatusState.RUNNING: "running",
    StatusState.SUCCESS: "success",
    StatusState.FAILURE: "failed",
    StatusState.ERROR: "failed",
    StatusState.CANCELED: "canceled",
}

# A commit id: SHA-1, or SHA-256 for repositories in that object format.
Sha = Annotated[str, StringConstraints(pattern=r"^(?:[0-9a-f]{40}|[0-9a-f]{64})$")]

BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"
TRIGGERING_MR_ACTIONS = frozenset({"open", "reopen", "update"})

# The "Test" button on a project without commits sends this fixed payload
# (`Gitlab::DataBuilder::Push::SAMPLE_DATA`); with commits, a test push is an ordinary
# push of the default branch's head and cannot be told apart.
SAMPLE_PUSH_SHA = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
SAMPLE_PUSH_OPTIONS = {"ci": {"skip": True}}

TRANSITION = re.compile(r"Cannot transition status via :(\w+) from :(\w+)")


# --- webhooks: payload -> event (pure) --------------------------------------------------


class _Payload(BaseModel):
    # Fields the bridge reads are typed strictly; everything else GitLab sends is ignored.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


PROJECT_PATH = re.compile(r"[^/]+(?:/[^/]+)+")  # namespace (subgroups too) and project


class _Project(_Payload):
    id: int
    path_with_namespace: Annotated[str, StringConstraints(pattern=f"^{PROJECT_PATH.pattern}$")]
    git_http_url: str


class _PushHook(_Payload):
    ref: str
    after: Sha
    checkout_sha: Sha | None = None  # null when the ref is deleted
    user_username: str | None = None
    project: _Project
    push_options: Any = None  # read only to recognise GitLab's sample payload


class _MergeRequestHead(_Payload):
    """What decides whether a merge request event is work at all."""

    class Attributes(_Payload):
        action: str | None = None  # absent on some old or hand-made deliveries
        state: str
        oldrev: Sha | None = None  # only when the source branch got new commits

    project: _Project
    object_attributes: Attributes


class _LastCommit(_Payload):
    id: Sha


class _SourceProject(_Payload):
    git_http_url: str


class _MergeRequestHook(_Payload):
    class Attributes(_Payload):
        iid: int
        source_branch: str
        target_branch: str
        source_project_id: int | None  # null once a fork's project is deleted
        target_project_id: int
        last_commit: _LastCommit | None = None  # null for a merge request without commits
        source: _SourceProject | None = None

    class User(_Payload):
        username: str

    user: User | None = None
    project: _Project
    object_attributes: Attributes


def _load(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise WebhookError(f"body is not JSON: {exc}") from None


def _validate(model: type[_Payload], document: Any) -> Any:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise WebhookError(f"{where}: {first['msg']}") from None


def _repo(project: _Project) -> Repo:
    return _named(project.path_with_namespace, project.git_http_url, project.id)


def _named(path_with_namespace: str, clone_url: str, project_id: int) -> Repo:
    # `project.namespace` is the namespace's display name ("GitlabHQ"), not its path:
    # owner and name come from `path_with_namespace` (subgroups keep their slashes).
    owner, name = path_with_namespace.rsplit("/", 1)
    return Repo(owner=owner, name=name, clone_url=clone_url, project_id=project_id)


def _deleted(sha: str) -> bool:
    return set(sha) == {"0"}


def parse_push(body: Any, delivery_id: str) -> WebhookOutcome:
    push = _validate(_PushHook, body)
    if push.after == SAMPLE_PUSH_SHA and push.push_options == SAMPLE_PUSH_OPTIONS:
        return Ping()
    if push.ref.startswith(BRANCH_PREFIX):
        branch, tag = push.ref.removeprefix(BRANCH_PREFIX), None
    elif push.ref.startswith(TAG_PREFIX):
        branch, tag = None, push.ref.removeprefix(TAG_PREFIX)
    else:
        return Ignored(f"ref {push.ref} is neither a branch nor a tag")
    what = f"branch {branch}" if tag is None else f"tag {tag}"
    if _deleted(push.after):
        return Ignored(f"{what} deleted")
    # A tag push's `after` is the tag object for an annotated tag; `checkout_sha` is the
    # commit it points to (the same as `after` for a branch).
    sha = push.checkout_sha or (push.after if tag is None else None)
    if sha is None:
        return Ignored(f"{what} does not point to a commit")
    return ForgeEvent(
        kind=EventKind.PUSH,
        repo=_repo(push.project),
        commit_sha=sha,
        branch=branch,
        tag=tag,
        delivery_id=delivery_id,
        sender=push.user_username,
    )


def parse_merge_request(body: Any, delivery_id: str) -> WebhookOutcome:
    head = _validate(_MergeRequestHead, body).object_attributes
    if head.state != "opened":
        # Also a "Test" delivery of a closed or merged merge request (sent as `open`).
        return Ignored(f"merge request {head.state} ({head.action})")
    if head.action not in TRIGGERING_MR_ACTIONS:
        return Ignored(f"merge request action {head.action}")
    if head.action == "update" and head.oldrev is None:
        return Ignored("merge request updated without new commits")
    mr = _validate(_MergeRequestHook, body)
    attrs = mr.object_attributes
    if attrs.last_commit is None:
        return Ignored(f"merge request !{attrs.iid} has no commits")
    if attrs.source_project_id is None or attrs.source is None:
        return Ignored(f"merge request !{attrs.iid}: its source project is gone")
    return ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=_repo(mr.project),
        commit_sha=attrs.last_commit.id,
        branch=attrs.target_branch,
        pull_number=attrs.iid,
        head_branch=attrs.source_branch,
        head_clone_url=attrs.source.git_http_url,
        from_fork=attrs.source_project_id != attrs.target_project_id,
        delivery_id=delivery_id,
        sender=mr.user.username if mr.user else None,
    )


PARSERS = {
    "Push Hook": parse_push,
    "Tag Push Hook": parse_push,
    "Merge Request Hook": parse_merge_request,
}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    # aiohttp's headers are case-insensitive; a plain dict (tests, journal) may not be.
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name.lower()), None)
    return value


# --- REST API v4 -------------------------------------------------------------------------


class HookAlertStatus(str, enum.Enum):
    """A project webhook's health (GitLab disables failing webhooks on its own)."""

    EXECUTABLE = "executable"
    TEMPORARILY_DISABLED = "temporarily_disabled"  # 5xx/timeouts: retried after `disabled_until`
    DISABLED = "disabled"  # 4xx answers: off until someone re-enables it


class GitLabHook(BaseModel):
    """A project webhook as `GET /projects/:id/hooks` lists it (the fields catch-up reads)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    url: str
    alert_status: HookAlertStatus = HookAlertStatus.EXECUTABLE  # absent on older GitLab versions
    disabled_until: datetime | None = None
    push_events: bool = False
    tag_push_events: bool = False
    merge_requests_events: bool = False


class _ApiBranch(BaseModel):
    class Commit(BaseModel):
        id: str

    name: str
    commit: Commit


class _ApiMergeRequest(BaseModel):
    iid: int
    sha: str | None  # null for a merge request without commits
    source_branch: str
    target_branch: str
    source_project_id: int | None
    target_project_id: int


class _ApiProject(BaseModel):
    http_url_to_repo: str


class _ApiRepository(_Payload):
    """ "Get a single project" (`GET /projects/:id`): the fields the bridge reads, strictly."""

    id: int
    path_with_namespace: Annotated[str, StringConstraints(pattern=f"^{PROJECT_PATH.pattern}$")]
    http_url_to_repo: Annotated[str, StringConstraints(min_length=1)]


def _answer(model: type[BaseModel], document: Any, what: str) -> Any:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ForgeApiError(
            f"{what}: unexpected answer: {where}: {first['msg']}", status=200, retry_after_s=None
        ) from None


def _shorten(text: str, limit: int = STATUS_TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _says(exc: ForgeApiError, text: str) -> bool:
    # `ApiClient` keeps GitLab's answer only in the message ("... HTTP 404: {body}").
    return text in str(exc)


class GitLabForge:
    """One GitLab instance: `api_url` is its base URL (`https://gitlab.com`), `token` a
    personal, project or group access token (`api` scope; Developer to set statuses,
    Maintainer to list webhooks)."""

    kind = ForgeKind.GITLAB

    def __init__(self, api_url: str, token: str, *, per_page: int = 100, timeout_s: float = 30.0) -> None:
        self.base_url = api_url.rstrip("/").removesuffix("/api/v4")
        self.per_page = per_page
        self.api = ApiClient(f"{self.base_url}/api/v4", {"PRIVATE-TOKEN": token}, timeout_s=timeout_s)

    # --- webhooks ---------------------------------------------------------------------

    def delivery_id(self, headers: Mapping[str, str]) -> str | None:
        """`Idempotency-Key` (GitLab 17.4+): the same on every resend of one event.
        Otherwise `X-Gitlab-Event-UUID`, which GitLab draws anew for each send (a resend
        from the UI or API gets a new one) and shares between recursive webhooks."""
        return _header(headers, "Idempotency-Key") or _header(headers, "X-Gitlab-Event-UUID")

    def repository_of(self, body: bytes) -> str | None:
        document = _load(body)
        project = document.get("project") if isinstance(document, dict) else None
        path = project.get("path_with_namespace") if isinstance(project, dict) else None
        return path if isinstance(path, str) and path else None

    def authentic(self, headers: Mapping[str, str], body: bytes, secrets: list[str]) -> bool:
        """GitLab sends the secret itself in `X-Gitlab-Token` (no signature of the body)."""
        given = _header(headers, "X-Gitlab-Token")
        if not given:
            return False
        # GitLab drops line breaks from the token it sends (a secret read from a file may
        # end in one). Every secret is compared: the time taken does not tell which matched.
        wanted = [re.sub(r"\r?\n", "", secret) for secret in secrets]
        # Undecodable header bytes arrive as surrogates: encode them back, never raise.
        token = given.encode("utf-8", "surrogateescape")
        matches = [hmac.compare_digest(token, secret.encode()) for secret in wanted if secret]
        return any(matches)

    def parse(self, headers: Mapping[str, str], body: bytes) -> WebhookOutcome:
        event = _header(headers, "X-Gitlab-Event")
        if not event:
            raise WebhookError("missing X-Gitlab-Event header")
        document = _load(body)
        if not isinstance(document, dict):
            raise WebhookError(f"body: expected a JSON object, got {type(document).__name__}")
        parser = PARSERS.get(event)
        if parser is None:
            return Ignored(f"event {event}")
        return parser(document, self.delivery_id(headers) or "")

    # --- REST API ---------------------------------------------------------------------

    @staticmethod
    def _project(repo: Repo) -> str:
        # Webhooks give the numeric id; a repository named only by path is addressed by
        # its URL-encoded path (`group%2Fsub%2Fproject`).
        return str(repo.project_id) if repo.project_id is not None else quote(repo.full_name, safe="")

    async def repository(self, full_name: str) -> Repo:
        """`GET /projects/:id` with the URL-encoded path (`group%2Fsub%2Fproject`): the
        project's id, clone URL and canonical path (GitLab finds a path in any case and
        under a renamed or moved project's old path)."""
        if not PROJECT_PATH.fullmatch(full_name):
            raise ForgeApiError(f"{full_name!r} is not namespace/project", status=None, retry_after_s=None)
        path = f"/projects/{quote(full_name, safe='')}"
        try:
            document = await self.api.get_json(path)
        except ForgeApiError as exc:
            if exc.status == 404:  # "404 Project Not Found", also for a project the token cannot see
                raise ForgeApiError(
                    f"GET {path}: repository {full_name} does not exist or the token cannot see it",
                    status=404,
                    retry_after_s=None,
                ) from None
            raise
        project = _answer(_ApiRepository, document, f"GET {path}")
        return _named(project.path_with_namespace, project.http_url_to_repo, project.id)

    async def read_file(self, repo: Repo, path: str, commit_sha: str) -> bytes | None:
        url = f"/projects/{self._project(repo)}/repository/files/{quote(path, safe='')}/raw"
        try:
            body, _ = await self.api.request("GET", url, params={"ref": commit_sha})
        except ForgeApiError as exc:
            # Only a missing file is "absent"; GitLab also answers 404 for a project the
            # token cannot see ("404 Project Not Found") and an unknown commit.
            if exc.status == 404 and _says(exc, "404 File Not Found"):
                return None
            raise
        return body

    async def set_status(self, repo: Repo, commit_sha: str, status: CommitStatus, *, ref: str | None = None) -> None:
        """Set the status named `status.context` on the commit. `ref` (a branch, a tag,
        `refs/merge-requests/<iid>/head`) says which pipeline the status joins; without it
        GitLab takes the commit's newest pipeline or the first branch that contains it.

        A state the status already has (`running` twice) is not an error; other
        transitions GitLab refuses (`pending` after `running`) raise a `ForgeApiError`
        that is not retryable. After a final state GitLab starts a new status, so a late
        `pending` would replace a final state: the caller must not send one."""
        state = GITLAB_STATES[status.state]
        fields: dict[str, str] = {"state": state, "name": status.context, "description": _shorten(status.description)}
        if status.target_url:
            if len(status.target_url) <= STATUS_TEXT_LIMIT:
                fields["target_url"] = status.target_url
            else:  # GitLab refuses the whole status for a longer one
                log.warning(
                    "forge.status.target_url_dropped",
                    repo=repo.full_name,
                    sha=commit_sha,
                    length=len(status.target_url),
                )
        try:
            await self._post_status(repo, commit_sha, fields, ref)
        except ForgeApiError as exc:
            if exc.status != 404 or ref is not None or not _says(exc, "References for commit"):
                raise
            # A fork's merge request head is on no branch of this project: GitLab needs
            # the merge request's ref to find a pipeline for it.
            mr_ref = await self._merge_request_ref(repo, commit_sha)
            if mr_ref is None:
                raise
            await self._post_status(repo, commit_sha, fields, mr_ref)

    async def _post_status(self, repo: Repo, sha: str, fields: dict[str, str], ref: str | None) -> None:
        body = dict(fields, ref=ref) if ref is not None else fields
        try:
            await self.api.request("POST", f"/projects/{self._project(repo)}/statuses/{sha}", json_body=body)
        except ForgeApiError as exc:
            transition = TRANSITION.search(str(exc)) if exc.status == 400 else None
            if transition is not None and transition.group(2) == fields["state"]:
                return  # already in that state (e.g. our earlier request did arrive)
            if transition is not None:
                raise ForgeApiError(
                    f"GitLab refuses {transition.group(2)} -> {fields['state']} for {fields['name']!r} on {sha}: {exc}",
                    status=400,
                    retry_after_s=None,
                ) from None
            if exc.status == 409 or (exc.status == 400 and _says(exc, "Failed to obtain a lock")):
                # Another update of this commit's statuses held GitLab's lock: try again.
                raise ForgeApiError(str(exc), status=exc.status, retry_after_s=DEFAULT_RETRY_S) from None
            raise

    async def _merge_request_ref(self, repo: Repo, sha: str) -> str | None:
        found = await self.api.get_json(
            f"/projects/{self._project(repo)}/repository/commits/{sha}/merge_requests", params={"state": "opened"}
        )
        for item in found if isinstance(found, list) else []:
            if isinstance(item, dict) and item.get("sha") == sha and isinstance(item.get("iid"), int):
                return f"refs/merge-requests/{item['iid']}/head"
        return None

    async def branches(self, repo: Repo) -> list[BranchHead]:
        path = f"/projects/{self._project(repo)}/repository/branches"
        items = await self.api.get_all(path, params={"per_page": str(self.per_page)})
        return [
            BranchHead(name=b.name, commit_sha=b.commit.id)
            for b in (_answer(_ApiBranch, item, f"GET {path}") for item in items)
        ]

    async def open_pulls(self, repo: Repo) -> list[PullHead]:
        path = f"/projects/{self._project(repo)}/merge_requests"
        items = await self.api.get_all(path, params={"state": "opened", "per_page": str(self.per_page)})
        fork_urls: dict[int, str | None] = {}
        pulls = []
        for item in items:
            mr = _answer(_ApiMergeRequest, item, f"GET {path}")
            if mr.sha is None or mr.source_project_id is None:
                log.info(
                    "forge.catchup.mr_skipped",
                    repo=repo.full_name,
                    iid=mr.iid,
                    reason="no commits" if mr.sha is None else "source project gone",
                )
                continue
            from_fork = mr.source_project_id != mr.target_project_id
            clone_url: str | None = repo.clone_url
            if from_fork:
                if mr.source_project_id not in fork_urls:
                    fork_urls[mr.source_project_id] = await self._clone_url(mr.source_project_id)
                clone_url = fork_urls[mr.source_project_id]
            if clone_url is None:
                log.warning(
                    "forge.catchup.mr_skipped",
                    repo=repo.full_name,
                    iid=mr.iid,
                    reason="the fork cannot be read",
                    source_project_id=mr.source_project_id,
                )
                continue
            pulls.append(
                PullHead(
                    number=mr.iid,
                    commit_sha=mr.sha,
                    base_branch=mr.target_branch,
                    head_branch=mr.source_branch,
                    head_clone_url=clone_url,
                    from_fork=from_fork,
                )
            )
        return pulls

    async def _clone_url(self, project_id: int) -> str | None:
        """A fork's clone URL (the merge request listing has only its id); None when the
        token cannot read it (GitLab answers 404 for a private project it cannot see)."""
        try:
            project = await self.api.get_json(f"/projects/{project_id}")
        except ForgeApiError as exc:
            if exc.retry_after_s is None and exc.status in (403, 404):
                return None
            raise
        return _answer(_ApiProject, project, f"GET /projects/{project_id}").http_url_to_repo

    async def hooks(self, repo: Repo) -> list[GitLabHook]:
        """The project's webhooks with their `alert_status` (needs the Maintainer role)."""
        path = f"/projects/{self._project(repo)}/hooks"
        items = await self.api.get_all(path, params={"per_page": str(self.per_page)})
        return [_answer(GitLabHook, item, f"GET {path}") for item in items]

    async def close(self) -> None:
        await self.api.close()
