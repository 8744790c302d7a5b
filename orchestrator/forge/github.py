"""GitHub (github.com and GitHub Enterprise Server): webhooks in, REST API v3 out.

Webhooks: `X-GitHub-Event` names the event, `X-GitHub-Delivery` is the delivery's GUID
and `X-Hub-Signature-256: sha256=<hex>` the HMAC-SHA256 of the body. `push` (branches
and tags) and `pull_request` (opened, reopened, synchronize) become `ForgeEvent`s;
`ping` is a `Ping`; deletions (`deleted: true`, `after` all zeros), other actions and
other events are `Ignored`.

API (`api_url` is `https://api.github.com`, or `https://HOST/api/v3` for Enterprise
Server): every call carries `Authorization: Bearer <token>`, `Accept:
application/vnd.github+json` and `X-GitHub-Api-Version: 2022-11-28`. A file at a commit
is read with the raw media type, so its bytes come back as they are (no base64).
Statuses take `error`, `failure`, `pending`, `success` and a description of at most 140
characters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from orchestrator.forge.base import (
    ZERO_SHA,
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
from orchestrator.forge.http import ApiClient, ForgeApiError

API_VERSION = "2022-11-28"
JSON_MEDIA_TYPE = "application/vnd.github+json"
RAW_MEDIA_TYPE = "application/vnd.github.raw+json"
USER_AGENT = "ci-vm-orchestrator-forge"
DESCRIPTION_LIMIT = 140
PER_PAGE = "100"  # GitHub's largest page: fewer calls against catch-up's budget

EVENT_HEADER = "X-GitHub-Event"
DELIVERY_HEADER = "X-GitHub-Delivery"
SIGNATURE_HEADER = "X-Hub-Signature-256"
SIGNATURE_PREFIX = "sha256="

PULL_ACTIONS = frozenset({"opened", "reopened", "synchronize"})  # the ones that bring a new head
SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")

GITHUB_STATE = {
    StatusState.PENDING: "pending",
    StatusState.RUNNING: "pending",
    StatusState.SUCCESS: "success",
    StatusState.FAILURE: "failure",
    StatusState.ERROR: "error",
    StatusState.CANCELED: "error",  # GitHub has no canceled state
}


class GitHubForge:
    kind = ForgeKind.GITHUB

    def __init__(self, api_url: str, token: str, *, timeout_s: float = 30.0) -> None:
        self.api = ApiClient(
            api_url,
            {
                "Authorization": f"Bearer {token}",
                "Accept": JSON_MEDIA_TYPE,
                "X-GitHub-Api-Version": API_VERSION,
                "User-Agent": USER_AGENT,  # GitHub refuses requests without one
            },
            timeout_s=timeout_s,
        )

    def __repr__(self) -> str:  # never the token
        return f"GitHubForge({self.api.base_url!r})"

    # --- webhooks ---------------------------------------------------------------------
    def delivery_id(self, headers: Mapping[str, str]) -> str | None:
        return _header(headers, DELIVERY_HEADER) or None

    def repository_of(self, body: bytes) -> str | None:
        payload = _load(body)
        repository = payload.get("repository")
        if not isinstance(repository, dict):
            return None
        full_name = repository.get("full_name")
        return full_name if isinstance(full_name, str) and full_name else None

    def authentic(self, headers: Mapping[str, str], body: bytes, secrets: list[str]) -> bool:
        signature = _header(headers, SIGNATURE_HEADER)
        if not signature.lower().startswith(SIGNATURE_PREFIX):
            return False
        given = signature[len(SIGNATURE_PREFIX) :].strip().lower().encode("ascii", errors="replace")
        matched = False
        for secret in secrets:
            if not secret:  # an empty key is a signature anybody can make
                continue
            expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest().encode()
            matched |= hmac.compare_digest(expected, given)  # every secret tried: no early exit
        return matched

    def parse(self, headers: Mapping[str, str], body: bytes) -> WebhookOutcome:
        event = _header(headers, EVENT_HEADER)
        if not event:
            raise WebhookError(f"no {EVENT_HEADER} header")
        payload = _load(body)
        if event == "ping":
            return Ping()
        delivery = _header(headers, DELIVERY_HEADER)
        if event == "push":
            return _push(payload, delivery)
        if event == "pull_request":
            return _pull_request(payload, delivery)
        return Ignored(f"{event} events are not handled")

    # --- API ----------------------------------------------------------------------------
    async def repository(self, full_name: str) -> Repo:
        """`GET /repos/{owner}/{repo}`: the repository under its canonical name (GitHub
        answers a renamed or transferred repository's old name by redirecting to it)."""
        owner, name = _owner_and_name(full_name)
        path = f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}"
        try:
            document = await self.api.get_json(path)
        except ForgeApiError as exc:
            if exc.status == 404:
                raise ForgeApiError(
                    f"GET {path}: repository {full_name} does not exist or the token cannot see it",
                    status=404,
                    retry_after_s=None,
                ) from None
            raise
        try:
            answer = _ApiRepository.model_validate(document)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "body"
            raise _malformed(path, WebhookError(f"{where}: {first['msg']}")) from None
        if answer.full_name != f"{answer.owner.login}/{answer.name}":
            raise _malformed(
                path,
                WebhookError(
                    f"full_name {answer.full_name!r} is not owner.login/name ({answer.owner.login}/{answer.name})"
                ),
            )
        return Repo(owner=answer.owner.login, name=answer.name, clone_url=answer.clone_url)

    async def read_file(self, repo: Repo, path: str, commit_sha: str) -> bytes | None:
        body, headers = await self.api.request(
            "GET",
            f"{_repo_path(repo)}/contents/{quote(path.lstrip('/'), safe='/')}",
            params={"ref": commit_sha},
            headers={"Accept": RAW_MEDIA_TYPE},
            missing_ok=True,
        )
        if body is None:
            return None
        # Directories, submodules and symlinks that lead nowhere have no raw form: GitHub
        # answers with their JSON description instead of file bytes.
        if _media_type(headers.get("Content-Type", "")) == "application/json":
            return None
        return body

    async def set_status(self, repo: Repo, commit_sha: str, status: CommitStatus) -> None:
        payload: dict[str, Any] = {
            "state": GITHUB_STATE[status.state],
            "context": status.context,
            "description": shorten(status.description),
        }
        if status.target_url:
            payload["target_url"] = status.target_url
        await self.api.request("POST", f"{_repo_path(repo)}/statuses/{quote(commit_sha, safe='')}", json_body=payload)

    async def branches(self, repo: Repo) -> list[BranchHead]:
        path = f"{_repo_path(repo)}/branches"
        items = await self.api.get_all(path, params={"per_page": PER_PAGE})
        heads: list[BranchHead] = []
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise WebhookError("a branch is not an object")
                heads.append(BranchHead(_text(item, "name"), _sha(_object(item, "commit"), "sha", "commit.")))
            except WebhookError as exc:
                raise _malformed(path, exc) from None
        return heads

    async def open_pulls(self, repo: Repo) -> list[PullHead]:
        path = f"{_repo_path(repo)}/pulls"
        items = await self.api.get_all(path, params={"state": "open", "per_page": PER_PAGE})
        pulls: list[PullHead] = []
        for item in items:
            try:
                if not isinstance(item, dict):
                    raise WebhookError("a pull request is not an object")
                pulls.append(_pull_head(item, repo.clone_url))
            except WebhookError as exc:
                raise _malformed(path, exc) from None
        return pulls

    async def close(self) -> None:
        await self.api.close()


class _ApiModel(BaseModel):
    # The fields read are strict (a number is not a string); the rest of the answer is ignored.
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


_NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class _ApiOwner(_ApiModel):
    login: _NonEmpty


class _ApiRepository(_ApiModel):
    """`GET /repos/{owner}/{repo}` ("full-repository"): the fields the bridge reads."""

    name: _NonEmpty
    full_name: _NonEmpty
    owner: _ApiOwner
    clone_url: _NonEmpty


def _owner_and_name(full_name: str) -> tuple[str, str]:
    owner, slash, name = full_name.partition("/")
    if not (owner and slash and name) or "/" in name:
        raise ForgeApiError(f"{full_name!r} is not owner/name", status=None, retry_after_s=None)
    return owner, name


def shorten(description: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """One line of at most `limit` characters, cut with an ellipsis when longer."""
    line = " ".join(description.split())
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


# --- payload → event --------------------------------------------------------------------
def _push(payload: dict[str, Any], delivery: str) -> WebhookOutcome:
    ref = _text(payload, "ref")
    if ref.startswith("refs/heads/"):
        branch, tag = ref.removeprefix("refs/heads/"), None
    elif ref.startswith("refs/tags/"):
        branch, tag = None, ref.removeprefix("refs/tags/")
    else:
        return Ignored(f"push to {ref}, neither a branch nor a tag")
    after = payload.get("after")
    if payload.get("deleted") is True or after == ZERO_SHA:
        return Ignored(f"{'branch' if tag is None else 'tag'} {branch or tag} deleted")
    return ForgeEvent(
        kind=EventKind.PUSH,
        repo=_repo(_object(payload, "repository")),
        commit_sha=_sha(payload, "after"),
        branch=branch,
        tag=tag,
        delivery_id=delivery,
        sender=_login(payload.get("sender")) or _pusher(payload.get("pusher")),
    )


def _pull_request(payload: dict[str, Any], delivery: str) -> WebhookOutcome:
    action = payload.get("action")
    if action not in PULL_ACTIONS:
        return Ignored(f"pull request {action} does not bring a new head")
    repo = _repo(_object(payload, "repository"))
    head = _pull_head(_object(payload, "pull_request"), repo.clone_url)
    return ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=repo,
        commit_sha=head.commit_sha,
        branch=head.base_branch,
        pull_number=head.number,
        head_branch=head.head_branch,
        head_clone_url=head.head_clone_url,
        from_fork=head.from_fork,
        delivery_id=delivery,
        sender=_login(payload.get("sender")),
    )


def _pull_head(pull: dict[str, Any], base_clone_url: str) -> PullHead:
    """A pull request's head, as a webhook and the pulls listing both describe it.

    It comes from a fork when its head repository is another one than its base. A fork
    deleted since the pull request was opened leaves `head.repo` null: that is a fork
    too (never trusted with secrets), whose commits still live in the base repository
    (`refs/pull/N/head`), so its clone URL is the base's."""
    number = pull.get("number")
    if not isinstance(number, int) or isinstance(number, bool) or number < 1:
        raise WebhookError("pull_request.number: not a positive integer")
    head, base = _object(pull, "head", "pull_request."), _object(pull, "base", "pull_request.")
    base_repo = _object(base, "repo", "pull_request.base.")
    base_name = _text(base_repo, "full_name", "pull_request.base.repo.")
    clone_url = _clone_url(base_repo) or base_clone_url
    head_repo = head.get("repo")
    if head_repo is None:
        from_fork, head_clone_url = True, clone_url
    elif isinstance(head_repo, dict):
        from_fork = _text(head_repo, "full_name", "pull_request.head.repo.").casefold() != base_name.casefold()
        head_clone_url = _clone_url(head_repo) or clone_url
    else:
        raise WebhookError("pull_request.head.repo: not an object")
    return PullHead(
        number=number,
        commit_sha=_sha(head, "sha", "pull_request.head."),
        base_branch=_text(base, "ref", "pull_request.base."),
        head_branch=_text(head, "ref", "pull_request.head."),
        head_clone_url=head_clone_url,
        from_fork=from_fork,
    )


def _repo(repository: dict[str, Any]) -> Repo:
    full_name = _text(repository, "full_name", "repository.")
    owner, slash, name = full_name.partition("/")
    if not (owner and slash and name):
        raise WebhookError(f"repository.full_name: {full_name!r} is not owner/name")
    clone_url = _clone_url(repository)
    if clone_url is None:
        raise WebhookError("repository.clone_url: missing")
    return Repo(owner=owner, name=name, clone_url=clone_url)


def _clone_url(repository: dict[str, Any]) -> str | None:
    url = repository.get("clone_url")
    return url if isinstance(url, str) and url else None


def _login(user: Any) -> str | None:
    login = user.get("login") if isinstance(user, dict) else None
    return login if isinstance(login, str) and login else None


def _pusher(pusher: Any) -> str | None:
    name = pusher.get("name") if isinstance(pusher, dict) else None
    return name if isinstance(name, str) and name else None


# --- small readers ------------------------------------------------------------------------
def _load(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested arrays
        raise WebhookError(f"the body is not JSON: {str(exc)[:200] or type(exc).__name__}") from None
    if not isinstance(payload, dict):
        raise WebhookError(f"the body is a JSON {type(payload).__name__}, not an object")
    return payload


def _header(headers: Mapping[str, str], name: str) -> str:
    """A header's value, its name matched without regard to case (a plain dict as well as
    aiohttp's case-insensitive headers); "" when absent."""
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value.strip() if isinstance(value, str) else ""


def _object(container: dict[str, Any], key: str, at: str = "") -> dict[str, Any]:
    value = container.get(key)
    if not isinstance(value, dict):
        raise WebhookError(f"{at}{key}: missing or not an object")
    return value


def _text(container: Any, key: str, at: str = "") -> str:
    value = container.get(key) if isinstance(container, dict) else None
    if not isinstance(value, str) or not value:
        raise WebhookError(f"{at}{key}: missing or not a string")
    return value


def _sha(container: dict[str, Any], key: str, at: str = "") -> str:
    value = _text(container, key, at).lower()
    if not SHA.fullmatch(value):
        raise WebhookError(f"{at}{key}: {value[:80]!r} is not a commit SHA")
    return value


def _repo_path(repo: Repo) -> str:
    return f"/repos/{quote(repo.owner, safe='')}/{quote(repo.name, safe='')}"


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _malformed(path: str, exc: WebhookError) -> ForgeApiError:
    return ForgeApiError(f"GET {path}: unexpected answer: {exc}", status=200, retry_after_s=None)
