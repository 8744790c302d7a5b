"""Forgejo/Gitea's REST API as the bridge uses it, on a `FakeForge`.

Routes (Forgejo `routers/api/v1/api.go`; handlers in `routers/api/v1/repo/`):
- `GET /api/v1/repos/{owner}/{repo}`: the `Repository` (`repo.go` `Get`) when the fake
  knows it (in `branches`, `pulls`, `project_ids` or a `files` key), else 404 (as for a
  private repository the token cannot see).
- `GET /api/v1/repos/{owner}/{repo}/raw/{filepath}?ref=`: the file's bytes, 404 when the
  file is not there at that ref (`file.go` `GetRawFile`).
- `POST /api/v1/repos/{owner}/{repo}/statuses/{sha}`: `CreateStatusOption` in, 201 and the
  stored `CommitStatus` out, its state under `status` (`status.go` `NewCommitStatus`).
  Text fields are stored whitespace-trimmed, as `models/git/commit_status.go` does.
- `GET /api/v1/repos/{owner}/{repo}/branches` and `.../pulls?state=open`: `page` (1-based),
  `limit` (default 30, at most 50), `Link` (next, last, first, prev; built on `app_url`, the
  instance's ROOT_URL) and `X-Total-Count` (`services/context/api.go` `genAPILinks`).
- Auth: `Authorization: token <token>`, else 401.

Where the fake is stricter than the forge: Forgejo stores any state string that fits its
VARCHAR(7) column and answers 500 for a commit it does not have; the fake answers 422
(the binding error status) for a state outside `pending success error failure warning`,
so a mapping bug cannot pass unseen, and 500 for a `sha` that is not 40 or 64 hex digits.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from tests.support.fakeforge import FakeForge, Pull, RecordedStatus

STATES = frozenset({"pending", "success", "error", "failure", "warning"})
MAX_RESPONSE_ITEMS = 50
SHA = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")


def install(fake: FakeForge, *, app_url: str | None = None) -> None:
    """Add the Forgejo routes to `fake.app` and its auth rule. `app_url` is the ROOT_URL the
    `Link` headers are built on (default: the fake's own URL, known once it started)."""
    fake.authorized = lambda request: request.headers.get("Authorization") == f"token {fake.token}"

    def root() -> str:
        return (app_url or fake.url).rstrip("/") + "/"

    def repo_of(request: web.Request) -> str:
        return f"{request.match_info['owner']}/{request.match_info['repo']}"

    def not_found() -> web.Response:
        return web.json_response({"errors": None, "message": "not found", "url": f"{root()}api/swagger"}, status=404)

    def clone_url(full_name: str) -> str:
        return f"{root()}{full_name}.git"

    def repository(full_name: str) -> dict[str, Any]:
        owner, name = full_name.split("/", 1)
        return {
            "id": fake.project_id(full_name),
            "name": name,
            "full_name": full_name,
            "owner": {"id": 1, "login": owner, "username": owner},
            "clone_url": clone_url(full_name),
            "html_url": f"{root()}{full_name}",
            "default_branch": "main",
        }

    def paginate(request: web.Request, items: list[Any]) -> web.Response:
        try:
            page = max(1, int(request.query.get("page", "1")))
            limit = int(request.query.get("limit", "0"))
        except ValueError:
            page, limit = 1, 0
        limit = fake.per_page_default if limit <= 0 else min(limit, MAX_RESPONSE_ITEMS)
        total = len(items)
        pages = max(1, -(-total // limit))
        chunk = items[(page - 1) * limit : page * limit]

        def link(to: int, rel: str) -> str:
            query = {**request.query, "page": str(to)}
            return f'<{root()}{request.path.lstrip("/")}?{urlencode(query)}>; rel="{rel}"'

        links = []
        if page < pages:
            links += [link(page + 1, "next"), link(pages, "last")]
        if page > 1:
            links += [link(1, "first"), link(page - 1, "prev")]
        headers = {"X-Total-Count": str(total)}
        if links:
            headers["Link"] = ",".join(links)
        return web.json_response(chunk, headers=headers)

    async def get_repository(request: web.Request) -> web.Response:
        repo = repo_of(request)
        known = (
            repo in fake.branches
            or repo in fake.pulls
            or repo in fake.project_ids
            or any(key[0] == repo for key in fake.files)
        )
        return web.json_response(repository(repo)) if known else not_found()

    async def raw_file(request: web.Request) -> web.Response:
        repo, path = repo_of(request), request.match_info["path"]
        ref = request.query.get("ref", "main")
        sha = fake.branches.get(repo, {}).get(ref, ref)
        data = fake.files.get((repo, sha, path))
        if data is None:
            return not_found()
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={"X-Gitea-Object-Type": "file", "X-Forgejo-Object-Type": "file"},
        )

    async def create_status(request: web.Request) -> web.Response:
        repo, sha = repo_of(request), request.match_info["sha"]
        try:
            form = json.loads(await request.read())
        except ValueError:
            return web.json_response(
                [{"fieldNames": [], "classification": "DeserializationError", "message": "invalid JSON"}], status=422
            )
        if not isinstance(form, dict) or any(
            not isinstance(form.get(key, ""), str) for key in ("state", "target_url", "description", "context")
        ):
            return web.json_response(
                [{"fieldNames": [], "classification": "DeserializationError", "message": "cannot unmarshal"}],
                status=422,
            )
        if form.get("state") not in STATES:
            return web.json_response({"message": f"invalid state {form.get('state')!r}"}, status=422)
        if not SHA.fullmatch(sha):
            return web.json_response({"message": f"GetCommit[{sha}]: object does not exist"}, status=500)
        status = RecordedStatus(
            repo=repo,
            sha=sha.lower(),
            state=form["state"],
            context=form.get("context", "").strip(),
            description=form.get("description", "").strip(),
            target_url=form.get("target_url", "").strip() or None,
        )
        fake.record_status(status)
        return web.json_response(
            {
                "id": len(fake.statuses),
                "status": status.state,
                "target_url": status.target_url or "",
                "description": status.description,
                "url": f"{root()}api/v1/repos/{repo}/statuses/{status.sha}",
                "context": status.context,
                "creator": {"id": 1, "login": "ci-bot", "username": "ci-bot"},
                "created_at": "2024-01-01T00:00:00Z",
                "updated_at": "2024-01-01T00:00:00Z",
            },
            status=201,
        )

    async def list_branches(request: web.Request) -> web.Response:
        repo = repo_of(request)
        if repo not in fake.branches:
            return not_found()
        items = [
            {
                "name": name,
                "commit": {"id": sha, "message": "", "url": f"{root()}{repo}/commit/{sha}"},
                "protected": False,
                "user_can_push": True,
                "user_can_merge": True,
            }
            for name, sha in sorted(fake.branches[repo].items())
        ]
        return paginate(request, items)

    def pull_json(repo: str, pull: Pull) -> dict[str, Any]:
        base = repository(repo)
        head = repository(pull.head_repo)
        return {
            "id": pull.number,
            "number": pull.number,
            "state": pull.state,
            "title": f"pull {pull.number}",
            "html_url": f"{root()}{repo}/pulls/{pull.number}",
            "flow": 0,
            "base": {
                "label": pull.base_branch,
                "ref": pull.base_branch,
                "sha": fake.branches.get(repo, {}).get(pull.base_branch, ""),
                "repo_id": base["id"],
                "repo": base,
            },
            "head": {
                "label": pull.head_branch,
                "ref": pull.head_branch,
                "sha": pull.head_sha,
                "repo_id": head["id"],
                "repo": head,
            },
        }

    async def list_pulls(request: web.Request) -> web.Response:
        repo = repo_of(request)
        if repo not in fake.pulls and repo not in fake.branches:
            return not_found()
        state = request.query.get("state", "open")
        pulls = [pull for pull in fake.pulls.get(repo, []) if state == "all" or pull.state == state]
        return paginate(request, [pull_json(repo, pull) for pull in sorted(pulls, key=lambda p: -p.number)])

    prefix = "/api/v1/repos/{owner}/{repo}"
    fake.app.router.add_get(prefix, get_repository)
    fake.app.router.add_get(prefix + "/raw/{path:.+}", raw_file)
    fake.app.router.add_post(prefix + "/statuses/{sha}", create_status)
    fake.app.router.add_get(prefix + "/branches", list_branches)
    fake.app.router.add_get(prefix + "/pulls", list_pulls)
