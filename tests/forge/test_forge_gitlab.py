"""GitLab: webhook deliveries (payloads from GitLab's documentation, one file per event
variant) into events, and the REST API v4 against a local fake of its documented
endpoints (`tests/support/fakeforge/gitlab.py`)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.forge.base import (
    CommitStatus,
    EventKind,
    ForgeEvent,
    Ignored,
    Ping,
    Repo,
    StatusState,
    WebhookError,
)
from orchestrator.forge.gitlab import (
    STATUS_TEXT_LIMIT,
    GitLabForge,
    GitLabHook,
    HookAlertStatus,
)
from orchestrator.forge.http import DEFAULT_RETRY_S, ForgeApiError
from tests.support.fakeforge import FakeForge, Pull
from tests.support.fakeforge import gitlab as fake_gitlab

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "forge" / "gitlab"
SECRET = "s3cr3t-webhook-token"
SHA = "0123456789abcdef0123456789abcdef01234567"
OTHER_SHA = "89abcdef0123456789abcdef0123456789abcdef"


def delivery(name: str) -> tuple[dict[str, str], bytes]:
    headers = json.loads((FIXTURES / f"{name}.headers.json").read_text())
    return headers, (FIXTURES / f"{name}.json").read_bytes()


def signed(name: str, token: str = SECRET) -> tuple[dict[str, str], bytes]:
    headers, body = delivery(name)
    return {**headers, "X-Gitlab-Token": token}, body


def payload(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def parse(document: dict[str, Any], event: str = "Push Hook") -> Any:
    return GitLabForge("https://gitlab.example.com", "t").parse(
        {"X-Gitlab-Event": event}, json.dumps(document).encode()
    )


forge = GitLabForge("https://gitlab.example.com", "token")

DIASPORA = Repo(owner="mike", name="diaspora", clone_url="http://example.com/mike/diaspora.git", project_id=15)
EXAMPLE = Repo(owner="jsmith", name="example", clone_url="http://example.com/jsmith/example.git", project_id=1)
GITLAB_TEST = Repo(
    owner="gitlabhq", name="gitlab-test", clone_url="http://example.com/gitlabhq/gitlab-test.git", project_id=1
)


def merge_request(sha: str = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", **changes: Any) -> ForgeEvent:
    event = ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=GITLAB_TEST,
        commit_sha=sha,
        branch="master",
        pull_number=1,
        head_branch="ms-viewport",
        head_clone_url="http://example.com/awesome_space/awesome_project.git",
        sender="root",
    )
    return dataclasses.replace(event, **changes)


# Each fixture and what the bridge makes of it (delivery ids are filled in from the headers).
EXPECTED: dict[str, ForgeEvent | Ping | Ignored] = {
    "push": ForgeEvent(
        kind=EventKind.PUSH,
        repo=DIASPORA,
        commit_sha="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        branch="master",
        sender="jsmith",
    ),
    "tag_push": ForgeEvent(
        kind=EventKind.PUSH,
        repo=EXAMPLE,
        commit_sha="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
        branch=None,
        tag="v1.0.0",
    ),
    # An annotated tag: `after` is the tag object, `checkout_sha` the commit.
    "tag_push_annotated": ForgeEvent(
        kind=EventKind.PUSH,
        repo=EXAMPLE,
        commit_sha="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
        branch=None,
        tag="v1.0.0-annotated",
    ),
    "push_branch_deleted": Ignored("branch feature/old deleted"),
    "tag_push_deleted": Ignored("tag v1.0.0 deleted"),
    "push_test_sample": Ping(),
    "merge_request_open": merge_request(),
    "merge_request_reopen": merge_request(),
    "merge_request_update_new_commits": merge_request(sha="b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327"),
    "merge_request_fork_open": merge_request(
        head_branch="fix-typo", from_fork=True, head_clone_url="http://example.com/contributor/awesome_project.git"
    ),
    "merge_request_update_title": Ignored("merge request updated without new commits"),
    "merge_request_close": Ignored("merge request closed (close)"),
    "merge_request_merge": Ignored("merge request merged (merge)"),
    "merge_request_approved": Ignored("merge request action approved"),
    "merge_request_test_delivery_merged": Ignored("merge request merged (open)"),
    "note_merge_request": Ignored("event Note Hook"),
    "issue": Ignored("event Issue Hook"),
}


# --- webhooks ---------------------------------------------------------------------------


def test_every_fixture_is_covered_and_carries_no_token():
    names = {p.name.removesuffix(".json") for p in FIXTURES.glob("*.json") if not p.name.endswith(".headers.json")}
    assert names == set(EXPECTED)
    for name in names:
        headers, _ = delivery(name)
        assert "X-Gitlab-Token" not in headers and headers["X-Gitlab-Event"].endswith("Hook")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_delivery_becomes_its_event(name: str):
    headers, body = signed(name)
    expected = EXPECTED[name]
    if isinstance(expected, ForgeEvent):
        delivery_id = headers.get("Idempotency-Key") or headers["X-Gitlab-Event-UUID"]
        expected = dataclasses.replace(expected, delivery_id=delivery_id)
    assert forge.authentic(headers, body, [SECRET])
    assert forge.parse(headers, body) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_repository_is_named_before_authentication(name: str):
    _, body = delivery(name)
    assert forge.repository_of(body) == payload(name)["project"]["path_with_namespace"]


def test_a_subgroup_project_keeps_its_namespace_path_as_owner():
    document = payload("push")
    document["project"]["path_with_namespace"] = "acme/platform/tools/diaspora"
    event = parse(document)
    assert (event.repo.owner, event.repo.name, event.repo.full_name) == (
        "acme/platform/tools",
        "diaspora",
        "acme/platform/tools/diaspora",
    )


def test_the_delivery_id_survives_a_resend_and_falls_back_before_gitlab_17_4():
    headers, _ = delivery("push")
    assert forge.delivery_id(headers) == headers["Idempotency-Key"]
    resend = {**headers, "X-Gitlab-Event-UUID": "a-new-one-on-every-send"}
    assert forge.delivery_id(resend) == headers["Idempotency-Key"]
    old, _ = delivery("tag_push")
    assert forge.delivery_id(old) == old["X-Gitlab-Event-UUID"]
    assert forge.delivery_id({k.lower(): v for k, v in old.items()}) == old["X-Gitlab-Event-UUID"]
    assert forge.delivery_id({"X-Gitlab-Event": "Push Hook"}) is None


def test_the_token_must_be_one_of_the_secrets():
    headers, body = signed("push")
    assert forge.authentic(headers, body, [SECRET])
    assert forge.authentic(headers, body, ["the-old-secret", SECRET])
    assert not forge.authentic(headers, body, ["something-else"])
    assert not forge.authentic(headers, body, [])
    assert not forge.authentic(signed("push", token="s3cr3t-webhook-tokeN")[0], body, [SECRET])
    assert not forge.authentic(delivery("push")[0], body, [SECRET])  # no X-Gitlab-Token
    assert not forge.authentic(signed("push", token="")[0], body, [""])
    assert not forge.authentic(signed("push", token="jeton-sécret")[0], body, [SECRET])
    assert forge.authentic({"x-gitlab-token": SECRET}, body, [SECRET])
    assert forge.authentic(headers, body, [SECRET + "\n"])  # GitLab sends the token without line breaks


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000, "not JSON"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
def test_bodies_that_are_not_json_objects_are_refused_with_the_reason(body: bytes, reason: str):
    with pytest.raises(WebhookError, match=reason):
        forge.parse({"X-Gitlab-Event": "Push Hook"}, body)


def test_a_body_that_is_not_json_cannot_name_its_repository():
    with pytest.raises(WebhookError, match="not JSON"):
        forge.repository_of(b"\x00garbage")
    assert forge.repository_of(b"[]") is None
    assert forge.repository_of(b'{"project": {"path_with_namespace": 7}}') is None


def test_a_delivery_without_an_event_header_is_refused():
    _, body = delivery("push")
    with pytest.raises(WebhookError, match="X-Gitlab-Event"):
        forge.parse({}, body)


@pytest.mark.parametrize(
    ("name", "event", "change", "field"),
    [
        ("push", "Push Hook", lambda d: d.pop("project"), "project"),
        ("push", "Push Hook", lambda d: d["project"].update(id="15"), "project.id"),
        (
            "push",
            "Push Hook",
            lambda d: d["project"].update(path_with_namespace="diaspora"),
            "project.path_with_namespace",
        ),
        ("push", "Push Hook", lambda d: d.update(after="da15608"), "after"),
        ("push", "Push Hook", lambda d: d.update(ref=None), "ref"),
        (
            "merge_request_open",
            "Merge Request Hook",
            lambda d: d["object_attributes"].pop("state"),
            "object_attributes.state",
        ),
        (
            "merge_request_open",
            "Merge Request Hook",
            lambda d: d["object_attributes"]["last_commit"].update(id=12),
            "object_attributes.last_commit.id",
        ),
        (
            "merge_request_open",
            "Merge Request Hook",
            lambda d: d["object_attributes"].update(iid="1"),
            "object_attributes.iid",
        ),
        (
            "merge_request_update_new_commits",
            "Merge Request Hook",
            lambda d: d["object_attributes"].update(oldrev=""),
            "object_attributes.oldrev",
        ),
    ],
)
def test_odd_payloads_name_the_field(name: str, event: str, change: Any, field: str):
    document = payload(name)
    change(document)
    with pytest.raises(WebhookError) as raised:
        parse(document, event)
    assert str(raised.value).startswith(f"{field}:")


def test_events_the_bridge_does_not_handle_are_ignored_whatever_their_shape():
    assert parse({"anything": True}, "Pipeline Hook") == Ignored("event Pipeline Hook")
    assert parse(payload("push"), "System Hook") == Ignored("event System Hook")
    closed = payload("merge_request_close")
    del closed["object_attributes"]["last_commit"], closed["object_attributes"]["source_branch"]
    assert parse(closed, "Merge Request Hook") == Ignored("merge request closed (close)")


def test_a_merge_request_without_commits_or_whose_fork_is_gone_is_ignored():
    empty = payload("merge_request_open")
    empty["object_attributes"]["last_commit"] = None
    assert parse(empty, "Merge Request Hook") == Ignored("merge request !1 has no commits")
    orphan = payload("merge_request_fork_open")
    orphan["object_attributes"].update(source_project_id=None, source=None)
    assert parse(orphan, "Merge Request Hook") == Ignored("merge request !1: its source project is gone")


def test_a_test_push_from_a_project_with_commits_is_an_ordinary_push():
    # GitLab builds it from the default branch's last commits: nothing marks it.
    document = payload("push")
    document["push_options"] = {}
    assert isinstance(parse(document), ForgeEvent)
    # A real push with `-o ci.skip` is still a push; only GitLab's fixed sample is a ping.
    document.update(after=SHA, checkout_sha=SHA, push_options={"ci": {"skip": True}})
    assert isinstance(parse(document), ForgeEvent)


# --- REST API against the fake ----------------------------------------------------------

PROJECT = "acme/platform/widgets"


@pytest.fixture
async def fake() -> AsyncIterator[FakeForge]:
    fake = FakeForge(token="glpat-test-token")
    fake_gitlab.install(fake)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def gitlab(fake: FakeForge) -> AsyncIterator[GitLabForge]:
    client = GitLabForge(fake.url, fake.token, per_page=2)
    yield client
    await client.close()


def repo_in(fake: FakeForge, full_name: str = PROJECT, *, by_id: bool = True) -> Repo:
    owner, name = full_name.rsplit("/", 1)
    project_id = fake.project_id(full_name)
    return Repo(
        owner=owner, name=name, clone_url=f"{fake.url}/{full_name}.git", project_id=project_id if by_id else None
    )


def status(
    state: StatusState,
    description: str = "queued",
    target_url: str | None = "https://ci.example/log/1",
    context: str = "orchestrator/test",
) -> CommitStatus:
    return CommitStatus(state=state, context=context, description=description, target_url=target_url)


async def test_reads_the_jobs_file_at_the_exact_commit(fake: FakeForge, gitlab: GitLabForge):
    repo = repo_in(fake)
    fake.files[(PROJECT, SHA, ".ci/jobs.yml")] = b"jobs: {}\n"
    assert await gitlab.read_file(repo, ".ci/jobs.yml", SHA) == b"jobs: {}\n"
    assert await gitlab.read_file(repo, ".ci/jobs.yml", OTHER_SHA) is None
    assert await gitlab.read_file(repo, "jobs.yml", SHA) is None
    call = fake.calls[0]
    # The route only matches with the slashes of the path sent as %2F, as GitLab requires.
    assert call.path == f"/api/v4/projects/{repo.project_id}/repository/files/.ci/jobs.yml/raw"
    assert call.query == {"ref": SHA}
    assert call.headers["PRIVATE-TOKEN"] == fake.token


async def test_a_project_without_an_id_is_addressed_by_its_encoded_path(fake: FakeForge, gitlab: GitLabForge):
    fake.files[(PROJECT, SHA, "a dir/jobs #1.yml")] = b"x"
    assert await gitlab.read_file(repo_in(fake, by_id=False), "a dir/jobs #1.yml", SHA) == b"x"
    assert fake.calls[0].path.startswith(f"/api/v4/projects/{PROJECT}/repository/files/")


async def test_a_project_the_token_cannot_see_is_an_error_not_a_missing_file(fake: FakeForge, gitlab: GitLabForge):
    hidden = Repo(owner="acme", name="secret", clone_url="x", project_id=99_999)
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.read_file(hidden, "jobs.yml", SHA)
    assert raised.value.status == 404 and raised.value.retry_after_s is None
    assert "Project Not Found" in str(raised.value)


@pytest.mark.parametrize(
    ("state", "gitlab_state"),
    [
        (StatusState.PENDING, "pending"),
        (StatusState.RUNNING, "running"),
        (StatusState.SUCCESS, "success"),
        (StatusState.FAILURE, "failed"),
        (StatusState.ERROR, "failed"),
        (StatusState.CANCELED, "canceled"),
    ],
)
async def test_every_state_reaches_gitlab_in_its_own_name(
    fake: FakeForge, gitlab: GitLabForge, state: StatusState, gitlab_state: str
):
    await gitlab.set_status(repo_in(fake), SHA, status(state, description="x" * 400))
    [recorded] = fake.statuses
    assert (recorded.repo, recorded.sha, recorded.state, recorded.context) == (
        PROJECT,
        SHA,
        gitlab_state,
        "orchestrator/test",
    )
    assert len(recorded.description) == STATUS_TEXT_LIMIT and recorded.description.endswith("…")
    assert recorded.target_url == "https://ci.example/log/1"
    body = json.loads(fake.calls[0].body)
    assert body == {
        "state": gitlab_state,
        "name": "orchestrator/test",
        "description": recorded.description,
        "target_url": "https://ci.example/log/1",
    }


async def test_a_job_goes_queued_running_finished(fake: FakeForge, gitlab: GitLabForge):
    repo = repo_in(fake)
    await gitlab.set_status(repo, SHA, status(StatusState.PENDING, "queued"))
    await gitlab.set_status(repo, SHA, status(StatusState.RUNNING, "running on host-a"))
    await gitlab.set_status(repo, SHA, status(StatusState.SUCCESS, "passed in 12 s"))
    assert fake.statuses_for(SHA, "orchestrator/test") == ["pending", "running", "success"]
    assert [s.description for s in fake.statuses] == ["queued", "running on host-a", "passed in 12 s"]


async def test_the_same_state_twice_is_not_an_error(fake: FakeForge, gitlab: GitLabForge):
    repo = repo_in(fake)
    await gitlab.set_status(repo, SHA, status(StatusState.RUNNING))
    await gitlab.set_status(repo, SHA, status(StatusState.RUNNING))  # e.g. the first answer was lost
    assert fake.statuses_for(SHA) == ["running"]
    assert [json.loads(c.body)["state"] for c in fake.calls] == ["running", "running"]


async def test_a_transition_gitlab_refuses_is_not_retryable(fake: FakeForge, gitlab: GitLabForge):
    repo = repo_in(fake)
    await gitlab.set_status(repo, SHA, status(StatusState.RUNNING))
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.set_status(repo, SHA, status(StatusState.PENDING))
    assert raised.value.status == 400 and raised.value.retry_after_s is None
    assert "refuses running -> pending" in str(raised.value)
    assert "Cannot transition status via :enqueue from :running" in str(raised.value)


async def test_after_a_final_state_gitlab_accepts_a_late_pending(fake: FakeForge, gitlab: GitLabForge):
    # GitLab starts a new status then: guarding final states is the reporter's job.
    repo = repo_in(fake)
    await gitlab.set_status(repo, SHA, status(StatusState.SUCCESS))
    await gitlab.set_status(repo, SHA, status(StatusState.PENDING))
    assert fake.statuses_for(SHA) == ["success", "pending"]


async def test_a_target_url_gitlab_would_refuse_is_left_out(fake: FakeForge, gitlab: GitLabForge):
    await gitlab.set_status(
        repo_in(fake), SHA, status(StatusState.PENDING, target_url="https://ci.example/" + "l" * 300)
    )
    assert fake.statuses[0].target_url is None


async def test_statuses_name_a_ref_when_given(fake: FakeForge, gitlab: GitLabForge):
    await gitlab.set_status(repo_in(fake), SHA, status(StatusState.PENDING), ref="release/1.x")
    assert json.loads(fake.calls[0].body)["ref"] == "release/1.x"


async def test_a_fork_merge_request_head_gets_its_status_through_the_merge_request_ref(
    fake: FakeForge, gitlab: GitLabForge
):
    repo = repo_in(fake)
    fake.branches[PROJECT] = {"main": OTHER_SHA}
    fake.pulls[PROJECT] = [
        Pull(number=7, head_sha=SHA, base_branch="main", head_branch="fix", head_repo="alice/widgets")
    ]
    await gitlab.set_status(repo, SHA, status(StatusState.PENDING))
    assert fake.statuses_for(SHA) == ["pending"]
    posts = [json.loads(c.body) for c in fake.calls if c.method == "POST"]
    assert [p.get("ref") for p in posts] == [None, "refs/merge-requests/7/head"]
    # Its later states find that pipeline without a detour.
    await gitlab.set_status(repo, SHA, status(StatusState.RUNNING))
    assert fake.statuses_for(SHA) == ["pending", "running"]


async def test_a_commit_on_no_ref_at_all_stays_an_error(fake: FakeForge, gitlab: GitLabForge):
    fake.pulls[PROJECT] = [
        Pull(number=7, head_sha=SHA, base_branch="main", head_branch="fix", head_repo="alice/widgets", state="closed")
    ]
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.set_status(repo_in(fake), SHA, status(StatusState.PENDING))
    assert raised.value.status == 404 and raised.value.retry_after_s is None


async def test_gitlabs_lock_contention_is_retried(fake: FakeForge, gitlab: GitLabForge):
    fake.fail_next(status=409)
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.set_status(repo_in(fake), SHA, status(StatusState.PENDING))
    assert raised.value.status == 409 and raised.value.retry_after_s == DEFAULT_RETRY_S


@pytest.mark.parametrize("link_header", [True, False])
async def test_branches_are_listed_across_pages(link_header: bool):
    fake = FakeForge(token="glpat-test-token")
    fake_gitlab.install(fake, link_header=link_header)
    await fake.start()
    gitlab = GitLabForge(fake.url, fake.token, per_page=2)
    try:
        heads = {f"feature/{i}": f"{i:040x}" for i in range(5)}
        fake.branches[PROJECT] = heads
        branches = await gitlab.branches(repo_in(fake))
        assert {b.name: b.commit_sha for b in branches} == heads
        pages = [c.query.get("page", "1") for c in fake.calls]
        assert pages == ["1", "2", "3"] and all(c.query["per_page"] == "2" for c in fake.calls)
    finally:
        await gitlab.close()
        await fake.close()


async def test_open_merge_requests_are_listed_across_pages_with_their_fork_clone_urls(
    fake: FakeForge, gitlab: GitLabForge
):
    fake.pulls[PROJECT] = [
        Pull(number=n, head_sha=f"{n:040x}", base_branch="main", head_branch=f"topic-{n}", head_repo=PROJECT)
        for n in range(1, 5)
    ] + [
        Pull(number=5, head_sha="5" * 40, base_branch="main", head_branch="fix", head_repo="alice/widgets"),
        Pull(number=6, head_sha="6" * 40, base_branch="main", head_branch="old", head_repo=PROJECT, state="closed"),
        Pull(number=7, head_sha="7" * 40, base_branch="main", head_branch="gone", head_repo=PROJECT, state="merged"),
    ]
    pulls = await gitlab.open_pulls(repo_in(fake))
    assert [p.number for p in pulls] == [5, 4, 3, 2, 1]  # GitLab lists the newest first
    fork = pulls[0]
    assert (fork.from_fork, fork.head_clone_url, fork.head_branch, fork.base_branch, fork.commit_sha) == (
        True,
        f"{fake.url}/alice/widgets.git",
        "fix",
        "main",
        "5" * 40,
    )
    assert all(not p.from_fork and p.head_clone_url == f"{fake.url}/{PROJECT}.git" for p in pulls[1:])
    listing = [c for c in fake.calls if c.path.endswith("/merge_requests")]
    assert len(listing) == 3 and all(c.query["state"] == "opened" for c in listing)


async def test_a_merge_request_from_a_fork_the_token_cannot_read_is_skipped(fake: FakeForge, gitlab: GitLabForge):
    fake.pulls[PROJECT] = [
        Pull(number=1, head_sha=SHA, base_branch="main", head_branch="fix", head_repo="mallory/widgets"),
        Pull(number=2, head_sha=OTHER_SHA, base_branch="main", head_branch="topic", head_repo=PROJECT),
    ]
    repo = repo_in(fake)
    fake.fail_next(status=404, path_prefix=f"/api/v4/projects/{fake.project_id('mallory/widgets')}")
    assert [p.number for p in await gitlab.open_pulls(repo)] == [2]


async def test_webhooks_are_listed_with_their_alert_status(fake: FakeForge, gitlab: GitLabForge):
    fake.hooks[PROJECT] = [
        {
            "id": 1,
            "url": "https://bridge.example/hooks/gitlab",
            "push_events": True,
            "merge_requests_events": True,
            "tag_push_events": True,
            "enable_ssl_verification": True,
            "alert_status": "executable",
            "disabled_until": None,
            "created_at": "2012-10-12T17:04:47Z",
        },
        {
            "id": 2,
            "url": "https://bridge.example/hooks/gitlab",
            "push_events": True,
            "alert_status": "temporarily_disabled",
            "disabled_until": "2026-11-25T10:20:00.000Z",
        },
        {"id": 3, "url": "https://old.example/hook", "alert_status": "disabled", "disabled_until": None},
    ]
    hooks = await gitlab.hooks(repo_in(fake))
    assert [(h.id, h.alert_status) for h in hooks] == [
        (1, HookAlertStatus.EXECUTABLE),
        (2, HookAlertStatus.TEMPORARILY_DISABLED),
        (3, HookAlertStatus.DISABLED),
    ]
    assert hooks[0].merge_requests_events and hooks[1].disabled_until is not None
    assert isinstance(hooks[2], GitLabHook) and hooks[2].disabled_until is None
    assert len([c for c in fake.calls if c.path.endswith("/hooks")]) == 2  # 3 hooks, 2 per page


@pytest.mark.parametrize(
    ("failure", "status_code", "retry_after_s"),
    [
        ({"status": 500}, 500, DEFAULT_RETRY_S),
        ({"status": 502, "retry_after": "3"}, 502, 3.0),
        ({"status": 429, "retry_after": "7"}, 429, 7.0),
        ({"status": 401}, 401, None),
        ({"status": 403}, 403, None),
        ({"status": 404}, 404, None),
    ],
)
async def test_failures_say_whether_trying_again_can_help(
    fake: FakeForge, gitlab: GitLabForge, failure: dict[str, Any], status_code: int, retry_after_s: float | None
):
    fake.branches[PROJECT] = {"main": SHA}
    fake.fail_next(**failure)
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.branches(repo_in(fake))
    assert raised.value.status == status_code and raised.value.retry_after_s == retry_after_s


async def test_a_rate_limit_without_retry_after_waits_for_the_reset(fake: FakeForge, gitlab: GitLabForge):
    reset = int(time.time()) + 30
    fake.fail_next(status=429, headers={"RateLimit-Remaining": "595", "RateLimit-Reset": str(reset)})
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.set_status(repo_in(fake), SHA, status(StatusState.PENDING))
    assert raised.value.retry_after_s is not None and 25 <= raised.value.retry_after_s <= 30


async def test_a_dropped_connection_is_retryable(fake: FakeForge, gitlab: GitLabForge):
    fake.fail_next(reset=True)
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.set_status(repo_in(fake), SHA, status(StatusState.PENDING))
    assert raised.value.status is None and raised.value.retry_after_s == DEFAULT_RETRY_S
    # aiohttp resends an idempotent GET once by itself: only a second drop reaches us.
    fake.fail_next(2, reset=True)
    with pytest.raises(ForgeApiError) as raised:
        await gitlab.read_file(repo_in(fake), "jobs.yml", SHA)
    assert raised.value.status is None and raised.value.retry_after_s == DEFAULT_RETRY_S


async def test_a_wrong_token_is_refused_and_not_retried(fake: FakeForge):
    client = GitLabForge(fake.url + "/api/v4/", "not-the-token")
    try:
        with pytest.raises(ForgeApiError) as raised:
            await client.read_file(repo_in(fake), "jobs.yml", SHA)
    finally:
        await client.close()
    assert raised.value.status == 401 and raised.value.retry_after_s is None
    assert fake.calls[0].path.startswith("/api/v4/projects/")  # a base URL with /api/v4 is taken as is


async def test_the_fake_checks_states_and_lengths_like_gitlab(fake: FakeForge):
    url = f"{fake.url}/api/v4/projects/{fake.project_id(PROJECT)}/statuses/{SHA}"
    async with aiohttp.ClientSession(headers={"PRIVATE-TOKEN": fake.token}) as session:
        async with session.post(url, data={"state": "bogus"}) as response:
            assert response.status == 400 and (await response.json())["error"] == "state does not have a valid value"
        async with session.post(url, params={"state": "success", "description": "d" * 256}) as response:
            assert response.status == 400
            assert (await response.json())["message"]["description"] == ["is too long (maximum is 255 characters)"]
        async with session.post(url, json={"state": "skipped"}) as response:
            assert response.status == 201 and (await response.json())["status"] == "skipped"
    assert fake.statuses_for(SHA) == ["skipped"]


# --- looking a project up by its path ----------------------------------------------------


async def test_a_project_is_looked_up_by_its_path(fake: FakeForge, gitlab: GitLabForge):
    fake.branches[PROJECT] = {"main": SHA}
    repo = await gitlab.repository(PROJECT)
    assert repo == Repo(
        owner="acme/platform",
        name="widgets",
        clone_url=f"{fake.url}/{PROJECT}.git",
        project_id=fake.project_id(PROJECT),
    )
    call = fake.calls[-1]
    # The route only matches with the path's slashes sent as %2F.
    assert (call.method, call.path) == ("GET", f"/api/v4/projects/{PROJECT}")
    assert call.headers["PRIVATE-TOKEN"] == fake.token
    # Known to the fake only by a file: it gets an id of its own, and later calls use it.
    fake.files[("alice/widgets", SHA, ".ci/jobs.yml")] = b"jobs: {}\n"
    fork = await gitlab.repository("alice/widgets")
    assert (fork.owner, fork.name, fork.project_id) == ("alice", "widgets", fake.project_id("alice/widgets"))
    assert await gitlab.read_file(fork, ".ci/jobs.yml", SHA) == b"jobs: {}\n"


async def test_a_project_lookup_reads_gitlabs_answer(gitlab: GitLabForge, monkeypatch: pytest.MonkeyPatch):
    """An answer shaped like "Get a single project" in GitLab's Projects API documentation;
    owner and name come from its `path_with_namespace`, not from the path asked for."""
    answer: dict[str, Any] = {
        "id": 3,
        "description": None,
        "default_branch": "main",
        "visibility": "private",
        "ssh_url_to_repo": "git@example.com:diaspora/diaspora-project-site.git",
        "http_url_to_repo": "https://example.com/diaspora/diaspora-project-site.git",
        "web_url": "https://example.com/diaspora/diaspora-project-site",
        "name": "Diaspora Project Site",
        "name_with_namespace": "Diaspora / Diaspora Project Site",
        "path": "diaspora-project-site",
        "path_with_namespace": "diaspora/diaspora-project-site",
        "namespace": {"id": 3, "name": "Diaspora", "path": "diaspora", "kind": "group", "full_path": "diaspora"},
    }

    sent = answer

    async def get_json(path: str, **_: Any) -> Any:
        return sent

    monkeypatch.setattr(gitlab.api, "get_json", get_json)
    assert await gitlab.repository("Diaspora/Diaspora-Project-Site") == Repo(
        owner="diaspora",
        name="diaspora-project-site",
        clone_url="https://example.com/diaspora/diaspora-project-site.git",
        project_id=3,
    )
    for field, value in (
        ("id", "3"),
        ("id", True),
        ("path_with_namespace", "no-namespace"),
        ("http_url_to_repo", None),
        ("http_url_to_repo", ...),
    ):
        sent = {**answer, field: value} if value is not ... else {k: v for k, v in answer.items() if k != field}
        with pytest.raises(ForgeApiError, match=field) as odd:
            await gitlab.repository("diaspora/diaspora-project-site")
        assert (odd.value.status, odd.value.retry_after_s) == (200, None)


async def test_an_unknown_project_is_a_404_that_says_so(fake: FakeForge, gitlab: GitLabForge):
    with pytest.raises(ForgeApiError, match="does not exist or the token cannot see it") as missing:
        await gitlab.repository("acme/platform/nothing")
    assert (missing.value.status, missing.value.retry_after_s) == (404, None)
    for bad in ("nothing", "acme//nothing", "/nothing", "acme/"):
        with pytest.raises(ForgeApiError, match="not namespace/project") as refused:
            await gitlab.repository(bad)
        assert refused.value.retry_after_s is None
    assert len(fake.calls) == 1


async def test_a_project_lookup_failing_on_the_server_can_be_retried(fake: FakeForge, gitlab: GitLabForge):
    fake.branches[PROJECT] = {"main": SHA}
    fake.fail_next(status=500)
    with pytest.raises(ForgeApiError) as failed:
        await gitlab.repository(PROJECT)
    assert (failed.value.status, failed.value.retry_after_s) == (500, DEFAULT_RETRY_S)
    assert (await gitlab.repository(PROJECT)).project_id == fake.project_id(PROJECT)
