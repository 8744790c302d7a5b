"""GitHub's REST API as the bridge uses it, on a `FakeForge`, plus signed webhook
deliveries the way GitHub sends them.

Routes (GitHub's paths, status codes and JSON):
- `GET /repos/{owner}/{repo}`: the repository (`full_name`, `owner.login`, `clone_url`...)
  when the fake knows it (in `branches`, `pulls`, `project_ids` or a `files` key); 404 `Not
  Found` otherwise, as GitHub answers for a repository the token cannot see.
- `GET /repos/{owner}/{repo}/contents/{path}?ref=`: the raw bytes with `Accept:
  application/vnd.github.raw+json` (or `.raw`), else GitHub's JSON object with base64
  content; a directory is its JSON listing whatever the Accept; 404 `Not Found`.
- `POST /repos/{owner}/{repo}/statuses/{sha}`: 201 with the status; 422 `Validation
  Failed` for an unknown state, a description over 140 characters or a bad SHA.
- `GET /repos/{owner}/{repo}/branches` and `/pulls?state=open|closed|all`: `per_page`
  (default `fake.per_page_default`, at most 100) and `page`, with `Link` rel next/last.

Auth: `Authorization: Bearer <token>` (GitHub also takes `token <token>`), else 401 `Bad
credentials`. An `X-GitHub-Api-Version` GitHub does not know is a 400, as there.
A `Pull` whose `head_repo` is "" stands for a fork deleted since: `head.repo` is null.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.support.fakeforge import FakeForge, Pull, RecordedStatus

API_VERSIONS = frozenset({"2022-11-28", "2026-03-10"})
RAW_MEDIA_TYPES = ("application/vnd.github.raw", "application/vnd.github.v3.raw")
STATES = frozenset({"error", "failure", "pending", "success"})
DESCRIPTION_LIMIT = 140
MAX_PER_PAGE = 100
SHA = re.compile(r"[0-9a-f]{40}")
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "forge" / "github"
WEB_URL = "https://github.com"


def install(fake: FakeForge) -> FakeForge:
    fake.authorized = lambda request: (
        request.headers.get("Authorization") in (f"Bearer {fake.token}", f"token {fake.token}")
    )
    routes = _Routes(fake)
    fake.app.router.add_get("/repos/{owner}/{repo}", routes.repository)
    fake.app.router.add_get("/repos/{owner}/{repo}/contents/{path:.+}", routes.contents)
    fake.app.router.add_post("/repos/{owner}/{repo}/statuses/{sha}", routes.create_status)
    fake.app.router.add_get("/repos/{owner}/{repo}/branches", routes.branches)
    fake.app.router.add_get("/repos/{owner}/{repo}/pulls", routes.pulls)
    return fake


# --- webhook deliveries --------------------------------------------------------------------
def fixture(name: str) -> bytes:
    """A payload from `tests/fixtures/forge/github/<name>.json`; its event is the name's
    part before the first dot (`pull_request.opened.fork` is a `pull_request`)."""
    return (FIXTURES / f"{name}.json").read_bytes()


def fixture_names() -> list[str]:
    return sorted(path.stem for path in FIXTURES.glob("*.json"))


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def webhook_headers(event: str, body: bytes, secret: str | None, *, delivery: str | None = None) -> dict[str, str]:
    """The headers GitHub sends with a delivery (no signature headers when `secret` is
    None, as for a webhook configured without one)."""
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "GitHub-Hookshot/7b1c2e4",
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "481516234",
        "X-GitHub-Hook-Installation-Target-ID": "99120045",
        "X-GitHub-Hook-Installation-Target-Type": "repository",
    }
    if secret is not None:
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
        headers["X-Hub-Signature-256"] = signature(body, secret)
    return headers


def delivery(name: str, secret: str | None, *, delivery_id: str | None = None) -> tuple[dict[str, str], bytes]:
    """A fixture as GitHub would deliver it: (headers, body)."""
    body = fixture(name)
    return webhook_headers(name.split(".", 1)[0], body, secret, delivery=delivery_id), body


# --- the API ---------------------------------------------------------------------------------
Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _github(handler: Route) -> Route:
    async def checked(request: web.Request) -> web.StreamResponse:
        version = request.headers.get("X-GitHub-Api-Version")
        if version is not None and version not in API_VERSIONS:
            return _message(400, f"API version {version} is not supported.")
        return await handler(request)

    return checked


def _message(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response(
        {"message": message, "documentation_url": "https://docs.github.com/rest", **extra}, status=status
    )


def _not_found() -> web.Response:
    return _message(404, "Not Found")


def _invalid(field: str, message: str) -> web.Response:
    return _message(
        422, "Validation Failed", errors=[{"resource": "Status", "code": "custom", "field": field, "message": message}]
    )


def _repo_json(fake: FakeForge, full_name: str) -> dict[str, Any]:
    owner, _, name = full_name.partition("/")
    return {
        "id": 100000 + sum(full_name.encode()),
        "name": name,
        "full_name": full_name,
        "owner": {"login": owner, "type": "User"},
        "private": False,
        "html_url": f"{WEB_URL}/{full_name}",
        "url": f"{fake.url}/repos/{full_name}",
        "clone_url": f"{WEB_URL}/{full_name}.git",
        "default_branch": "main",
    }


class _Routes:
    def __init__(self, fake: FakeForge) -> None:
        self.fake = fake
        self.repository = _github(self._repository)
        self.contents = _github(self._contents)
        self.create_status = _github(self._create_status)
        self.branches = _github(self._branches)
        self.pulls = _github(self._pulls)

    def _known(self, repo: str) -> bool:
        return repo in self.fake.branches or repo in self.fake.pulls or any(key[0] == repo for key in self.fake.files)

    async def _repository(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        if not (self._known(repo) or repo in self.fake.project_ids):
            return _not_found()
        return web.json_response(_repo_json(self.fake, repo))

    async def _contents(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        path = request.match_info["path"].strip("/")
        ref = request.query.get("ref") or "main"
        sha = self.fake.branches.get(repo, {}).get(ref, ref)  # a branch name or a commit
        content = self.fake.files.get((repo, sha, path))
        if content is None:
            entries = sorted(
                {
                    key[2][len(path) + 1 :].split("/", 1)[0]
                    for key in self.fake.files
                    if key[0] == repo and key[1] == sha and key[2].startswith(path + "/")
                }
            )
            if not entries:
                return _not_found()
            # A directory has no raw form: its listing comes back as JSON whatever the Accept.
            return web.json_response([{"type": "file", "name": entry, "path": f"{path}/{entry}"} for entry in entries])
        accept = request.headers.get("Accept", "")
        if any(media in accept for media in RAW_MEDIA_TYPES):
            return web.Response(body=content, headers={"Content-Type": "application/vnd.github.raw; charset=utf-8"})
        encoded = base64.encodebytes(content).decode()  # GitHub wraps base64 at 60 or 76 columns
        return web.json_response(
            {
                "type": "file",
                "encoding": "base64",
                "size": len(content),
                "name": path.rsplit("/", 1)[-1],
                "path": path,
                "content": encoded,
                "sha": hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest(),
            }
        )

    async def _create_status(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        sha = request.match_info["sha"]
        try:
            body = await request.json()
        except ValueError:
            return _message(400, "Problems parsing JSON")
        if not isinstance(body, dict):
            return _message(400, "Problems parsing JSON")
        state = body.get("state")
        description = body.get("description")
        target_url = body.get("target_url")
        context = body.get("context") or "default"
        if state not in STATES:
            return _invalid("state", f"state is not included in the list: {state!r}")
        if description is not None and (not isinstance(description, str) or len(description) > DESCRIPTION_LIMIT):
            return _invalid("description", f"description is too long (maximum is {DESCRIPTION_LIMIT} characters)")
        if not SHA.fullmatch(sha):
            return _message(422, f"No commit found for SHA: {sha}")
        self.fake.record_status(RecordedStatus(repo, sha, state, context, description or "", target_url))
        number = len(self.fake.statuses)
        return web.json_response(
            {
                "url": f"{self.fake.url}/repos/{repo}/statuses/{sha}",
                "id": number,
                "node_id": f"SC_{number}",
                "state": state,
                "description": description,
                "target_url": target_url,
                "context": context,
                "created_at": "2026-11-25T10:00:00Z",
                "updated_at": "2026-11-25T10:00:00Z",
                "creator": {"login": "orchestrator-bot", "type": "User"},
            },
            status=201,
        )

    async def _branches(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        if not self._known(repo):
            return _not_found()
        items = [
            {
                "name": name,
                "commit": {"sha": sha, "url": f"{self.fake.url}/repos/{repo}/commits/{sha}"},
                "protected": name == "main",
            }
            for name, sha in self.fake.branches.get(repo, {}).items()
        ]
        return self._page(request, items)

    async def _pulls(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        if not self._known(repo):
            return _not_found()
        state = request.query.get("state", "open")
        if state not in ("open", "closed", "all"):
            return _invalid("state", f"state is not included in the list: {state!r}")
        pulls = [pull for pull in self.fake.pulls.get(repo, []) if state in ("all", pull.state)]
        return self._page(request, [self._pull_json(repo, pull) for pull in pulls])

    def _pull_json(self, repo: str, pull: Pull) -> dict[str, Any]:
        base = _repo_json(self.fake, repo)
        head_repo = _repo_json(self.fake, pull.head_repo) if pull.head_repo else None
        head_owner = pull.head_repo.partition("/")[0] if pull.head_repo else "ghost"
        return {
            "url": f"{self.fake.url}/repos/{repo}/pulls/{pull.number}",
            "id": 900000 + pull.number,
            "number": pull.number,
            "state": pull.state,
            "title": f"Pull request {pull.number}",
            "draft": False,
            "head": {
                "label": f"{head_owner}:{pull.head_branch}",
                "ref": pull.head_branch,
                "sha": pull.head_sha,
                "user": {"login": head_owner},
                "repo": head_repo,
            },
            "base": {
                "label": f"{base['owner']['login']}:{pull.base_branch}",
                "ref": pull.base_branch,
                "sha": self.fake.branches.get(repo, {}).get(pull.base_branch, "0" * 40),
                "user": base["owner"],
                "repo": base,
            },
        }

    def _page(self, request: web.Request, items: list[Any]) -> web.Response:
        try:
            per_page = min(MAX_PER_PAGE, max(1, int(request.query.get("per_page", self.fake.per_page_default))))
            page = max(1, int(request.query.get("page", "1")))
        except ValueError:
            return _message(422, "Invalid pagination parameters")
        last = max(1, -(-len(items) // per_page))
        links = []

        def link(number: int, rel: str) -> str:
            return f'<{request.url.update_query(per_page=str(per_page), page=str(number))}>; rel="{rel}"'

        if page > 1:
            links += [link(page - 1, "prev"), link(1, "first")]
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        headers = {"Link": ", ".join(links)} if links else {}
        return web.json_response(items[(page - 1) * per_page : page * per_page], headers=headers)
