"""Forgejo and Gitea: one module, because they share the REST API and the webhook payloads.

Forgejo sends every webhook header twice, as `X-Forgejo-*` and `X-Gitea-*` (plus the
`X-Gogs-*`, `X-GitHub-*` and `X-Hub-Signature*` copies); Gitea sends `X-Gitea-*` and the
copies. Either is accepted. Sources (Forgejo `services/webhook/shared/payloader.go`
`AddDefaultHeaders`, Gitea `services/webhook/deliver.go`, `modules/structs/hook.go`,
`modules/structs/pull.go`, `services/convert/pull.go`, `services/repository/push.go`,
`routers/web/repo/setting/webhook.go`) are listed with the fixtures in
`tests/fixtures/forge/forgejo/README.md`.

The module has three parts kept apart: the payload models and `parse_*` functions
(payload -> validated models), `_convert_*` (models -> `ForgeEvent` / `PullHead`), and
`ForgejoForge`'s API methods (files, statuses, branch heads, open pull requests).

What the forge does that the bridge must know:
- The "Test Delivery" button and `POST /repos/{o}/{r}/hooks/{id}/tests` send an ordinary
  `push` of the default branch head with `before` == `after`; no real push has that, so
  such a push is a `Ping`.
- A branch deletion is only a `delete` event; a tag deletion is a `push` with an all-zero
  `after` *and* a `delete` event. Both are ignored, as is any push with a zero `after`.
- A push of an annotated tag has the tag object's id in `after`; the commit is
  `head_commit.id`.
- A pull request's sub-events (`synchronized`, label, assignee, milestone and review
  request changes) all arrive as event `pull_request`; `X-*-Event-Type` says which and
  `action` says what happened (`synchronized` with a d). Only `opened`, `reopened` and
  `synchronized` of an open pull request run jobs.
- A pull request is treated as from a fork (no secrets) when its head repository is not
  the base repository, when the head repository is gone (`head.repo` null, `repo_id` -1),
  and for AGit pull requests (`flow` 1): anyone with read access can open those by
  pushing to `refs/for/<branch>`, though `head.repo` is the base repository. The head
  commit of every pull request is in the base repository at `refs/pull/<n>/head`.
- Commit statuses: states `pending`, `success`, `error`, `failure`, `warning`. The API
  does not validate the state (the column is VARCHAR(7)) nor limit the description
  (TEXT, whitespace-trimmed); a commit the forge does not have is an HTTP 500.
- Pagination: `page` (1-based) and `limit` (at most `[api] MAX_RESPONSE_ITEMS`, 50 by
  default), `Link` and `X-Total-Count`. The `Link` URLs are built from the instance's
  `ROOT_URL`, which may be another host than the one the bridge calls, so this module
  asks for the next page by number on its own base URL (the token never follows a link).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

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
from orchestrator.forge.http import MAX_PAGES, NEXT_LINK, ApiClient, ForgeApiError

API_PREFIX = "/api/v1"
# The forge stores any length (TEXT); the commit status popup shows the description on
# one line beside the context, so a longer text only hides the link. GitHub's limit is
# 140; 255 keeps a host name and a short reason readable.
DESCRIPTION_LIMIT = 255
PAGE_LIMIT = 50  # Forgejo/Gitea `[api] MAX_RESPONSE_ITEMS` default; a larger `limit` is cut to it

# What each bridge state becomes in the forge's five states (`warning` is unused).
FORGE_STATES: dict[StatusState, str] = {
    StatusState.PENDING: "pending",
    StatusState.RUNNING: "pending",
    StatusState.SUCCESS: "success",
    StatusState.FAILURE: "failure",
    StatusState.ERROR: "error",
    StatusState.CANCELED: "error",
}

RUN_ACTIONS = frozenset({"opened", "reopened", "synchronized"})
BRANCH_PREFIX = "refs/heads/"
TAG_PREFIX = "refs/tags/"


# --- headers ------------------------------------------------------------------------


def _headers(headers: Mapping[str, str]) -> dict[str, str]:
    """Lower-cased names: the receiver may hand over a plain dict."""
    return {name.lower(): value for name, value in headers.items()}


def _one_header(headers: dict[str, str], suffix: str) -> str | None:
    """`X-Forgejo-<suffix>` or `X-Gitea-<suffix>`; both present must agree."""
    forgejo = headers.get(f"x-forgejo-{suffix}", "").strip()
    gitea = headers.get(f"x-gitea-{suffix}", "").strip()
    if forgejo and gitea and forgejo != gitea:
        name = suffix.title()
        raise WebhookError(f"X-Forgejo-{name} ({forgejo[:64]!r}) and X-Gitea-{name} ({gitea[:64]!r}) disagree")
    return forgejo or gitea or None


def _signature_ok(signature: str, body: bytes, secrets: list[str]) -> bool:
    given = signature.strip().lower().encode("ascii", "replace")
    if len(given) != 64:
        return False
    # Every secret is tried (no early exit), so the time taken says nothing about which
    # secret, if any, matched.
    matched = False
    for secret in secrets:
        if secret:  # an empty secret means "unsigned": Forgejo then sends an empty signature
            expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
            matched |= hmac.compare_digest(expected, given)
    return matched


# --- payload models -----------------------------------------------------------------


def _lower(value: str) -> str:
    return value.lower()


# A commit id: SHA-1, or SHA-256 for repositories created with `object_format_name` sha256.
Sha = Annotated[str, StringConstraints(pattern=r"^([0-9a-fA-F]{40}|[0-9a-fA-F]{64})$"), AfterValidator(_lower)]
# Owner and repository names: Forgejo's `AlphaDashDot` (ASCII letters, digits, `-_.`).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,255}")
Name = Annotated[str, StringConstraints(pattern=f"^{NAME_PATTERN.pattern}$")]
HttpUrl = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]
Text = Annotated[str, StringConstraints(max_length=1024)]
Ref = Annotated[str, StringConstraints(min_length=1, max_length=1024)]


class _Model(BaseModel):
    # Fields the bridge reads are strict (a number is not a string); the rest of the
    # forge's payload is ignored.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class _User(_Model):
    login: Text = ""
    username: Text = ""  # Forgejo/Gitea also send `login` as `username`, for Gogs clients

    @property
    def name(self) -> str:
        return self.login or self.username


class _Owner(_User):
    @model_validator(mode="after")
    def _named(self) -> _Owner:
        if not self.name:
            raise ValueError("has neither login nor username")
        if not NAME_PATTERN.fullmatch(self.name):
            raise ValueError(f"login {self.name[:64]!r} is not a Forgejo user or organization name")
        return self


class _Repository(_Model):
    id: int
    name: Name
    owner: _Owner
    clone_url: HttpUrl


class _Commit(_Model):
    id: Sha


class _Push(_Model):
    ref: Ref
    before: Sha
    after: Sha
    head_commit: _Commit | None = None
    repository: _Repository
    pusher: _User | None = None
    sender: _User | None = None


class _PullAction(_Model):
    action: Text


class _BranchInfo(_Model):
    """`PRBranchInfo`: `label` is the plain branch name (not GitHub's `owner:branch`);
    `ref` is the branch name too, or `refs/pull/<n>/head` once the head branch is gone."""

    label: Text = ""
    ref: Ref
    sha: Text = ""
    repo_id: int | None = None
    repo: _Repository | None = None

    @property
    def repository_id(self) -> int | None:
        return self.repo.id if self.repo is not None else self.repo_id


class _HeadInfo(_BranchInfo):
    sha: Sha


class _PullRequest(_Model):
    number: Annotated[int, Field(ge=1)]
    state: Text
    head: _HeadInfo
    base: _BranchInfo
    flow: int = 0  # 0: a branch (maybe in a fork); 1: AGit (`git push origin HEAD:refs/for/main`)


class _PullPayload(_Model):
    action: Text
    pull_request: _PullRequest
    repository: _Repository
    sender: _User | None = None


class _ApiBranch(_Model):
    name: Ref
    commit: _Commit


M = TypeVar("M", bound=_Model)


def _reason(exc: ValidationError) -> str:
    """The first problem, naming the field by its path (`pull_request.head.sha`)."""
    error = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in error["loc"]) or "body"
    return f"{where}: {error['msg'][:200]}"


def _validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WebhookError(_reason(exc)) from None


def _load(body: bytes) -> dict[str, Any]:
    if body.lstrip().startswith(b"payload="):
        raise WebhookError("the body is form-encoded: set the webhook's POST content type to application/json")
    try:
        payload = json.loads(body)
    except RecursionError:
        raise WebhookError("the body is not JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a number too long
        raise WebhookError(f"the body is not JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise WebhookError(f"the body is JSON {type(payload).__name__}, not an object")
    return payload


# --- parse: payload -> event --------------------------------------------------------


def _is_zero(sha: str) -> bool:
    return set(sha) == {"0"}


def _repo(repository: _Repository) -> Repo:
    return Repo(owner=repository.owner.name, name=repository.name, clone_url=repository.clone_url)


def _sender(*users: _User | None) -> str | None:
    return next((user.name for user in users if user is not None and user.name), None)


def parse_push(payload: dict[str, Any], delivery_id: str) -> WebhookOutcome:
    push = _validate(_Push, payload)
    if push.before == push.after:
        return Ping()  # the test delivery: the default branch's head, unchanged
    if _is_zero(push.after):
        return Ignored(f"deletion of {push.ref[:200]}")
    repo, sender = _repo(push.repository), _sender(push.sender, push.pusher)
    if push.ref.startswith(BRANCH_PREFIX) and len(push.ref) > len(BRANCH_PREFIX):
        return ForgeEvent(
            kind=EventKind.PUSH,
            repo=repo,
            commit_sha=push.after,
            branch=push.ref[len(BRANCH_PREFIX) :],
            delivery_id=delivery_id,
            sender=sender,
        )
    if push.ref.startswith(TAG_PREFIX) and len(push.ref) > len(TAG_PREFIX):
        # `after` of an annotated tag is the tag object; `head_commit` is its commit.
        commit = push.head_commit.id if push.head_commit is not None else push.after
        return ForgeEvent(
            kind=EventKind.PUSH,
            repo=repo,
            commit_sha=commit,
            branch=None,
            tag=push.ref[len(TAG_PREFIX) :],
            delivery_id=delivery_id,
            sender=sender,
        )
    return Ignored(f"push to {push.ref[:200]}, neither a branch nor a tag")


def parse_pull_request(payload: dict[str, Any], delivery_id: str, event_type: str | None) -> WebhookOutcome:
    action = _validate(_PullAction, payload).action
    if action not in RUN_ACTIONS:
        return Ignored(f"pull request {action or 'without action'} ({event_type or 'pull_request'})")
    pull = _validate(_PullPayload, payload)
    pr = pull.pull_request
    if pr.state != "open":
        return Ignored(f"pull request #{pr.number} {action} but {pr.state}")
    head = _convert_pull(pr, base_id=pull.repository.id, base_clone_url=pull.repository.clone_url)
    return ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=_repo(pull.repository),
        commit_sha=head.commit_sha,
        branch=head.base_branch,
        pull_number=head.number,
        head_branch=head.head_branch,
        head_clone_url=head.head_clone_url,
        from_fork=head.from_fork,
        delivery_id=delivery_id,
        sender=_sender(pull.sender),
    )


# --- convert: pull request -> our model (shared by webhooks and catch-up) ------------


def _convert_pull(pr: _PullRequest, *, base_id: int | None, base_clone_url: str) -> PullHead:
    head_id = pr.head.repository_id
    agit = pr.flow != 0
    from_fork = agit or head_id is None or base_id is None or head_id != base_id
    if pr.head.repo is not None and not agit:
        clone_url = pr.head.repo.clone_url
    else:  # a deleted fork or an AGit head: the commits are at refs/pull/<n>/head here
        clone_url = base_clone_url
    return PullHead(
        number=pr.number,
        commit_sha=pr.head.sha,
        base_branch=pr.base.ref,
        head_branch=pr.head.label or pr.head.ref,
        head_clone_url=clone_url,
        from_fork=from_fork,
    )


def _description(text: str) -> str:
    text = " ".join(text.split())  # the forge trims; inner newlines would break its one-line view
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


# --- the forge ----------------------------------------------------------------------


class ForgejoForge:
    """A Forgejo or Gitea instance: `api_url` is its base URL (`https://codeberg.org`,
    or with the sub-path it is served under); API paths start with `/api/v1`."""

    kind = ForgeKind.FORGEJO

    def __init__(self, api_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.api = ApiClient(self.api_url, {"Authorization": f"token {token}"}, timeout_s=timeout_s)

    @property
    def calls(self) -> int:
        return self.api.calls

    # --- webhooks (pure) --------------------------------------------------------------

    def delivery_id(self, headers: Mapping[str, str]) -> str | None:
        # Never raises (the receiver asks before it authenticates); `parse` refuses a
        # delivery whose two ids disagree.
        lowered = _headers(headers)
        return lowered.get("x-forgejo-delivery", "").strip() or lowered.get("x-gitea-delivery", "").strip() or None

    def repository_of(self, body: bytes) -> str | None:
        repository = _load(body).get("repository")
        if not isinstance(repository, dict):
            return None
        full_name = repository.get("full_name")
        if isinstance(full_name, str) and full_name.count("/") == 1:
            return full_name
        owner, name = repository.get("owner"), repository.get("name")
        login = owner.get("login") if isinstance(owner, dict) else None
        return f"{login}/{name}" if isinstance(login, str) and isinstance(name, str) else None

    def authentic(self, headers: Mapping[str, str], body: bytes, secrets: list[str]) -> bool:
        lowered = _headers(headers)
        signatures = [lowered[name] for name in ("x-forgejo-signature", "x-gitea-signature") if lowered.get(name)]
        # Forgejo sends both with the same value: each one present must verify.
        return bool(signatures) and all(_signature_ok(signature, body, secrets) for signature in signatures)

    def parse(self, headers: Mapping[str, str], body: bytes) -> WebhookOutcome:
        lowered = _headers(headers)
        event = _one_header(lowered, "event")
        if event is None:
            raise WebhookError("no X-Forgejo-Event or X-Gitea-Event header")
        event_type = _one_header(lowered, "event-type")
        payload = _load(body)
        delivery = _one_header(lowered, "delivery") or ""
        if event == "push":
            return parse_push(payload, delivery)
        if event == "pull_request":
            return parse_pull_request(payload, delivery, event_type)
        return Ignored(f"{event[:64]} event")

    # --- API --------------------------------------------------------------------------

    @staticmethod
    def _repo_path(repo: Repo) -> str:
        return f"{API_PREFIX}/repos/{quote(repo.owner, safe='')}/{quote(repo.name, safe='')}"

    async def repository(self, full_name: str) -> Repo:
        """`GET /api/v1/repos/{owner}/{repo}`: the repository under the name the forge
        gives it (owner and name as stored, which a lookup ignoring case may not match)."""
        owner, slash, name = full_name.partition("/")
        if not (owner and slash and name) or "/" in name:
            raise ForgeApiError(f"{full_name!r} is not owner/name", status=None, retry_after_s=None)
        path = self._repo_path(Repo(owner=owner, name=name, clone_url=""))
        body, _ = await self.api.request("GET", path, missing_ok=True)
        if body is None:
            raise ForgeApiError(
                f"GET {path}: repository {full_name} does not exist or the token cannot see it",
                status=404,
                retry_after_s=None,
            )
        try:
            document = json.loads(body)
        except (ValueError, RecursionError):
            raise ForgeApiError(f"GET {path}: the answer is not JSON", status=200, retry_after_s=None) from None
        return _repo(self._api_item(_Repository, document, path))

    async def read_file(self, repo: Repo, path: str, commit_sha: str) -> bytes | None:
        url = f"{self._repo_path(repo)}/raw/{quote(path.lstrip('/'), safe='/')}"
        body, _ = await self.api.request("GET", url, params={"ref": commit_sha}, missing_ok=True)
        return body

    async def set_status(self, repo: Repo, commit_sha: str, status: CommitStatus) -> None:
        form: dict[str, str] = {
            "state": FORGE_STATES[status.state],
            "context": status.context.strip(),
            "description": _description(status.description),
        }
        if status.target_url:
            form["target_url"] = status.target_url
        path = f"{self._repo_path(repo)}/statuses/{quote(commit_sha, safe='')}"
        await self.api.request("POST", path, json_body=form)

    async def branches(self, repo: Repo) -> list[BranchHead]:
        path = f"{self._repo_path(repo)}/branches"
        items = [self._api_item(_ApiBranch, item, path) for item in await self._all_pages(path, {})]
        return [BranchHead(name=branch.name, commit_sha=branch.commit.id) for branch in items]

    async def open_pulls(self, repo: Repo) -> list[PullHead]:
        path = f"{self._repo_path(repo)}/pulls"
        pulls = [self._api_item(_PullRequest, item, path) for item in await self._all_pages(path, {"state": "open"})]
        return [
            _convert_pull(
                pr,
                base_id=pr.base.repository_id,
                base_clone_url=pr.base.repo.clone_url if pr.base.repo is not None else repo.clone_url,
            )
            for pr in pulls
            if pr.state == "open"
        ]

    async def close(self) -> None:
        await self.api.close()

    async def _all_pages(self, path: str, params: dict[str, str]) -> list[Any]:
        """Every item of a listing: page 1, 2, ... on our own base URL while the answer's
        `Link` has rel="next" (its URL is the instance's ROOT_URL, not necessarily ours)."""
        items: list[Any] = []
        for page in range(1, MAX_PAGES + 1):
            body, headers = await self.api.request(
                "GET", path, params={**params, "page": str(page), "limit": str(PAGE_LIMIT)}
            )
            try:
                batch = json.loads(body or b"null")
            except (ValueError, RecursionError):
                raise ForgeApiError(f"GET {path}: the answer is not JSON", status=200, retry_after_s=None) from None
            if not isinstance(batch, list):
                raise ForgeApiError(
                    f"GET {path}: expected a list, got {type(batch).__name__}", status=200, retry_after_s=None
                )
            items.extend(batch)
            if not batch or not NEXT_LINK.search(headers.get("Link", "")):
                return items
        raise ForgeApiError(f"GET {path}: more than {MAX_PAGES} pages", status=200, retry_after_s=None)

    @staticmethod
    def _api_item(model: type[M], item: Any, path: str) -> M:
        try:
            return model.model_validate(item)
        except ValidationError as exc:
            raise ForgeApiError(f"GET {path}: {_reason(exc)}", status=200, retry_after_s=None) from None
