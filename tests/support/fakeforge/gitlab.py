"""GitLab's REST API v4 as the bridge uses it, on a `FakeForge`.

Routes, status codes and JSON follow GitLab's documentation and its code paths:
`PRIVATE-TOKEN` auth; projects addressed by numeric id or URL-encoded path (404 "404
Project Not Found" otherwise); the project itself (`id`, `path_with_namespace`,
`http_url_to_repo`, the id from `fake.project_id`); the raw file at a ref (404 "404 File Not Found"); commit
statuses with GitLab's state machine (a status per name and ref that is pending or
running is updated, a finished one is followed by a new one; refused transitions are 400
"Cannot transition status via :run from :running (...)"); branches, merge requests and
webhooks paginated with `per_page`/`page`, `Link`, `X-Next-Page` and `X-Total-Pages`.

Statuses are recorded in GitLab's state names (`failed`, not `failure`), one record per
accepted request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

from tests.support.fakeforge import FakeForge, Pull, RecordedStatus

API = "/api/v4/projects"
MAX_PER_PAGE = 100  # GitLab's cap on `per_page`
STATES = ("pending", "running", "success", "failed", "canceled", "skipped")
TEXT_LIMIT = 255  # `ref`, `target_url`, `description`
MR_STATES = {"open": "opened", "closed": "closed", "merged": "merged"}


@dataclass
class _Job:
    """One external job (GitLab's `GenericCommitStatus`)."""

    id: int
    name: str
    ref: str
    status: str = "created"
    description: str | None = None
    target_url: str | None = None


@dataclass
class _StatusBook:
    jobs: dict[tuple[str, str], list[_Job]] = field(default_factory=dict)  # (repo, sha) -> jobs
    next_id: int = 1


class _Refused(Exception):
    def __init__(self, event: str, state: str) -> None:
        super().__init__(
            f'Cannot transition status via :{event} from :{state} (Reason(s): Status cannot transition via "{event}")'
        )


# GitLab's CommitStatus state machine, for the events the statuses API fires.
_EVENTS: dict[str, dict[str, str]] = {
    "enqueue": {"created": "pending", "skipped": "pending"},
    "run": {"pending": "running"},
    "success": {"created": "success", "pending": "success", "running": "success"},
    "drop": {"created": "failed", "pending": "failed", "running": "failed"},
    "cancel": {"created": "canceled", "pending": "canceled", "running": "canceled"},
    "skip": {"created": "skipped", "pending": "skipped"},
}


def _fire(job: _Job, event: str, *, strict: bool = True) -> None:
    target = _EVENTS[event].get(job.status)
    if target is None:
        if strict:
            raise _Refused(event, job.status)
        return
    job.status = target


def _apply(job: _Job, state: str) -> None:
    """`Ci::CreateCommitStatusService#apply_job_state!`."""
    if state == "pending":
        _fire(job, "enqueue")
    elif state == "running":
        _fire(job, "enqueue", strict=False)
        _fire(job, "run")
    else:
        _fire(job, {"success": "success", "failed": "drop", "canceled": "cancel", "skipped": "skip"}[state])


def _message(text: Any, status: int) -> web.Response:
    return web.json_response({"message": text}, status=status)


def install(fake: FakeForge, *, link_header: bool = True) -> None:
    """GitLab's routes and auth on `fake` (before `fake.start()`). `link_header=False`
    leaves out `Link` so that clients must follow `X-Next-Page`."""
    book = _StatusBook()
    fake.authorized = lambda request: request.headers.get("PRIVATE-TOKEN") == fake.token

    def repo_of(request: web.Request) -> str:
        repo = fake.repo_of_project(request.match_info["project"])
        if repo is None:
            raise web.HTTPNotFound(
                text=json.dumps({"message": "404 Project Not Found"}), content_type="application/json"
            )
        return repo

    def project_json(repo: str) -> dict[str, Any]:
        return {
            "id": fake.project_id(repo),
            "path_with_namespace": repo,
            "path": repo.rsplit("/", 1)[1],
            "web_url": f"{fake.url}/{repo}",
            "http_url_to_repo": f"{fake.url}/{repo}.git",
            "ssh_url_to_repo": f"git@127.0.0.1:{repo}.git",
            "default_branch": "main",
        }

    def paginate(request: web.Request, items: list[Any]) -> web.Response:
        """Offset pagination as `API::Helpers::Pagination` answers it."""
        try:
            per_page = min(MAX_PER_PAGE, max(1, int(request.query.get("per_page", fake.per_page_default))))
            page = max(1, int(request.query.get("page", "1")))
        except ValueError:
            return web.json_response({"error": "page is invalid"}, status=400)
        total_pages = max(1, math.ceil(len(items) / per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        headers = {
            "X-Page": str(page),
            "X-Per-Page": str(per_page),
            "X-Total": str(len(items)),
            "X-Total-Pages": str(total_pages),
            "X-Prev-Page": str(page - 1) if page > 1 else "",
            "X-Next-Page": str(page + 1) if page < total_pages else "",
        }
        if link_header:

            def link(number: int, rel: str) -> str:
                query = {k: v for k, v in request.query.items() if k not in ("page", "per_page")}
                query.update(page=str(number), per_page=str(per_page))
                qs = "&".join(f"{quote(k)}={quote(v)}" for k, v in query.items())
                return f'<{fake.url}{request.raw_path.split("?", 1)[0]}?{qs}>; rel="{rel}"'

            links = [link(page - 1, "prev")] if page > 1 else []
            links += [link(page + 1, "next")] if page < total_pages else []
            links += [link(1, "first"), link(total_pages, "last")]
            headers["Link"] = ", ".join(links)
        return web.json_response(chunk, headers=headers)

    def merge_request_json(repo: str, pull: Pull) -> dict[str, Any]:
        return {
            "id": 10_000 + pull.number,
            "iid": pull.number,
            "project_id": fake.project_id(repo),
            "title": f"MR {pull.number}",
            "state": MR_STATES.get(pull.state, pull.state),
            "target_branch": pull.base_branch,
            "source_branch": pull.head_branch,
            "source_project_id": fake.project_id(pull.head_repo),
            "target_project_id": fake.project_id(repo),
            "sha": pull.head_sha,
            "draft": False,
            "web_url": f"{fake.url}/{repo}/-/merge_requests/{pull.number}",
        }

    async def raw_file(request: web.Request) -> web.Response:
        repo = repo_of(request)
        ref = request.query.get("ref", "")
        content = fake.files.get((repo, ref, request.match_info["file_path"]))
        if content is None:
            return _message("404 File Not Found", 404)
        return web.Response(body=content, content_type="text/plain")

    async def project(request: web.Request) -> web.Response:
        """ "Get a single project": by id, or by path for any project the fake knows (in
        `branches`, `pulls`, `project_ids` or a `files` key), which then gets its id."""
        wanted = request.match_info["project"]
        known = not wanted.isdigit() and (
            wanted in fake.branches or wanted in fake.pulls or any(key[0] == wanted for key in fake.files)
        )
        return web.json_response(project_json(wanted if known else repo_of(request)))

    async def branches(request: web.Request) -> web.Response:
        repo = repo_of(request)
        heads = sorted(fake.branches.get(repo, {}).items())
        return paginate(
            request,
            [
                {
                    "name": name,
                    "merged": False,
                    "protected": False,
                    "default": name == "main",
                    "commit": {"id": sha, "short_id": sha[:8]},
                }
                for name, sha in heads
            ],
        )

    async def merge_requests(request: web.Request) -> web.Response:
        repo = repo_of(request)
        state = request.query.get("state", "all")
        newest_first = sorted(fake.pulls.get(repo, []), key=lambda p: p.number, reverse=True)
        found = [merge_request_json(repo, p) for p in newest_first]
        return paginate(request, [m for m in found if state == "all" or m["state"] == state])

    async def commit_merge_requests(request: web.Request) -> web.Response:
        repo = repo_of(request)
        sha, state = request.match_info["sha"], request.query.get("state")
        found = [merge_request_json(repo, p) for p in fake.pulls.get(repo, []) if p.head_sha == sha]
        return paginate(request, [m for m in found if state is None or m["state"] == state])

    async def hooks(request: web.Request) -> web.Response:
        return paginate(request, list(fake.hooks.get(repo_of(request), [])))

    def default_ref(repo: str, sha: str) -> str | None:
        """The ref GitLab gives a status sent without one: the commit's newest pipeline's,
        else a branch that holds the commit. The fake knows no ancestry: a commit is taken
        to be on a branch unless it is known only as the head of a fork's merge request."""
        earlier = book.jobs.get((repo, sha))
        if earlier:
            return earlier[-1].ref
        heads = fake.branches.get(repo, {})
        at_head = sorted(name for name, head in heads.items() if head == sha)
        if at_head:
            return at_head[0]
        if any(p.head_sha == sha and p.head_repo != repo for p in fake.pulls.get(repo, [])):
            return None
        return min(heads, default="main")

    async def post_status(request: web.Request) -> web.Response:
        repo = repo_of(request)
        sha = request.match_info["sha"]
        params = await _params(request)
        state = params.get("state")
        if not state:
            return web.json_response({"error": "state is missing"}, status=400)
        if state not in STATES:
            return web.json_response({"error": "state does not have a valid value"}, status=400)
        too_long = {
            key: ["is too long (maximum is 255 characters)"]
            for key in ("ref", "target_url", "description")
            if len(params.get(key) or "") > TEXT_LIMIT
        }
        if too_long:
            return _message(too_long, 400)
        ref = params.get("ref") or default_ref(repo, sha)
        if ref is None:
            return _message("404 References for commit Not Found", 404)
        name = params.get("name") or params.get("context") or "default"
        jobs = book.jobs.setdefault((repo, sha), [])
        job = next(
            (j for j in reversed(jobs) if j.name == name and j.ref == ref and j.status in ("pending", "running")), None
        )
        fresh = job is None
        if job is None:
            job = _Job(id=book.next_id, name=name, ref=ref)
        before = (job.status, job.description, job.target_url)
        job.description = params.get("description", job.description)
        job.target_url = params.get("target_url", job.target_url)
        try:
            _apply(job, state)
        except _Refused as exc:
            job.status, job.description, job.target_url = before  # the transaction is rolled back
            return _message(str(exc), 400)
        if fresh:
            book.next_id += 1
            jobs.append(job)
        fake.record_status(
            RecordedStatus(
                repo=repo,
                sha=sha,
                state=job.status,
                context=name,
                description=job.description or "",
                target_url=job.target_url,
            )
        )
        return web.json_response(
            {
                "id": job.id,
                "sha": sha,
                "ref": ref,
                "status": job.status,
                "name": name,
                "target_url": job.target_url,
                "description": job.description,
                "allow_failure": False,
                "coverage": None,
            },
            status=201,
        )

    project_path = API + "/{project}"
    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = [
        ("GET", project_path, project),
        ("GET", project_path + "/repository/files/{file_path}/raw", raw_file),
        ("GET", project_path + "/repository/branches", branches),
        ("GET", project_path + "/repository/commits/{sha}/merge_requests", commit_merge_requests),
        ("GET", project_path + "/merge_requests", merge_requests),
        ("GET", project_path + "/hooks", hooks),
        ("POST", project_path + "/statuses/{sha}", post_status),
    ]
    for method, path, handler in routes:
        fake.app.router.add_route(method, path, handler)


async def _params(request: web.Request) -> dict[str, str]:
    """Grape reads parameters from the query string, a JSON body or a form alike."""
    params = dict(request.query)
    body = await request.read()
    if not body:
        return params
    if request.content_type == "application/json":
        try:
            document = json.loads(body)
        except ValueError:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "body is not JSON"}), content_type="application/json"
            ) from None
        if isinstance(document, dict):
            params.update({k: v for k, v in document.items() if isinstance(v, str)})
    else:
        params.update(parse_qsl(body.decode(errors="replace")))
    return params
