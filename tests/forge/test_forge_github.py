"""GitHub: webhook deliveries (fixtures in tests/fixtures/forge/github) into events, and
the REST API calls against the local fake (tests/support/fakeforge/github.py)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from orchestrator.forge.base import (
    CommitStatus,
    EventKind,
    Forge,
    ForgeEvent,
    ForgeKind,
    Ignored,
    Ping,
    Repo,
    StatusState,
    WebhookError,
)
from orchestrator.forge.github import GitHubForge, shorten
from orchestrator.forge.http import DEFAULT_RETRY_S, ForgeApiError
from tests.support.fakeforge import FakeForge, Pull
from tests.support.fakeforge.github import delivery, fixture, fixture_names, install, signature, webhook_headers

SECRET = "hook-secret"
REPO = Repo("octo-org", "widgets", "https://github.com/octo-org/widgets.git")
BASE_CLONE = "https://github.com/octo-org/widgets.git"
SHA = "9c4f1e2b7a3d85e06f1b2c3d4e5f60718293a4b5"

forge_for_webhooks: Forge = GitHubForge("https://api.github.com", "unused")  # mypy checks the Protocol


def parsed(name: str) -> Any:
    headers, body = delivery(name, SECRET, delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    return forge_for_webhooks.parse(headers, body)


def edited(name: str, change: Any) -> bytes:
    payload = json.loads(fixture(name))
    change(payload)
    return json.dumps(payload).encode()


# --- authenticity ------------------------------------------------------------------------
def test_signature_matches_githubs_documented_example() -> None:
    # The example in GitHub's "Validating webhook deliveries".
    headers = {"X-Hub-Signature-256": "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"}
    assert forge_for_webhooks.authentic(headers, b"Hello, World!", ["It's a Secret to Everybody"])


def test_delivery_signed_with_any_configured_secret_is_authentic() -> None:
    headers, body = delivery("push.branch", SECRET)
    assert forge_for_webhooks.authentic(headers, body, ["an-older-secret", SECRET])
    lower = {name.lower(): value for name, value in headers.items()}
    assert forge_for_webhooks.authentic(lower, body, [SECRET])


@pytest.mark.parametrize("case", ["wrong secret", "body changed", "no signature", "sha1 only", "no prefix", "garbage"])
def test_badly_signed_delivery_is_not_authentic(case: str) -> None:
    headers, body = delivery("push.branch", SECRET)
    secrets = [SECRET]
    if case == "wrong secret":
        secrets = ["not-the-secret"]
    elif case == "body changed":
        body = body.replace(b"octo-org", b"evil-org")
    elif case == "no signature":
        headers = webhook_headers("push", body, None)
    elif case == "sha1 only":
        del headers["X-Hub-Signature-256"]
    elif case == "no prefix":
        headers["X-Hub-Signature-256"] = signature(body, SECRET).removeprefix("sha256=")
    else:
        headers["X-Hub-Signature-256"] = "sha256=ünïcode"
    assert not forge_for_webhooks.authentic(headers, body, secrets)


def test_an_empty_secret_authenticates_nothing() -> None:
    body = fixture("push.branch")
    assert not forge_for_webhooks.authentic(webhook_headers("push", body, ""), body, [""])
    assert not forge_for_webhooks.authentic(webhook_headers("push", body, SECRET), body, [])


def test_delivery_id_and_repository_are_read_before_authentication() -> None:
    headers, body = delivery("push.branch", SECRET, delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert forge_for_webhooks.delivery_id(headers) == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert forge_for_webhooks.delivery_id({"x-github-delivery": "abc"}) == "abc"
    assert forge_for_webhooks.delivery_id({}) is None
    assert forge_for_webhooks.repository_of(body) == "octo-org/widgets"
    assert forge_for_webhooks.repository_of(b'{"zen": "org hook ping"}') is None
    with pytest.raises(WebhookError):
        forge_for_webhooks.repository_of(b"{not json")


# --- events ------------------------------------------------------------------------------------
def test_every_fixture_is_understood() -> None:
    names = fixture_names()
    assert len(names) >= 15
    for name in names:
        assert isinstance(parsed(name), ForgeEvent | Ping | Ignored), name


def test_ping_is_answered() -> None:
    assert parsed("ping") == Ping()


def test_push_to_a_branch_is_a_push_event() -> None:
    assert parsed("push.branch") == ForgeEvent(
        kind=EventKind.PUSH,
        repo=REPO,
        commit_sha=SHA,
        branch="main",
        delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        sender="octocat",
    )
    assert parsed("push.branch").ref_key == "branch/main"


def test_a_new_branch_runs() -> None:
    event = parsed("push.branch_created")
    assert isinstance(event, ForgeEvent)
    assert (event.kind, event.branch, event.commit_sha) == (EventKind.PUSH, "release/1.4", SHA)


def test_tag_push_is_a_tag_event() -> None:
    event = parsed("push.tag")
    assert isinstance(event, ForgeEvent)
    assert (event.kind, event.tag, event.branch) == (EventKind.PUSH, "v1.4.0", None)
    assert event.commit_sha == "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"
    assert event.ref_key == "tag/v1.4.0"


@pytest.mark.parametrize("name", ["push.branch_deleted", "push.tag_deleted"])
def test_deleting_a_branch_or_tag_is_ignored(name: str) -> None:
    outcome = parsed(name)
    assert isinstance(outcome, Ignored) and "deleted" in outcome.reason


def test_a_push_whose_after_is_all_zeros_is_a_deletion_even_without_the_flag() -> None:
    def zero(payload: dict[str, Any]) -> None:
        payload["after"], payload["deleted"] = "0" * 40, False

    body = edited("push.branch", zero)
    outcome = forge_for_webhooks.parse(webhook_headers("push", body, SECRET), body)
    assert isinstance(outcome, Ignored)


def test_a_push_to_another_kind_of_ref_is_ignored() -> None:
    body = edited("push.branch", lambda payload: payload.update(ref="refs/notes/commits"))
    assert isinstance(forge_for_webhooks.parse(webhook_headers("push", body, SECRET), body), Ignored)


@pytest.mark.parametrize("name", ["pull_request.opened", "pull_request.reopened", "pull_request.synchronize"])
def test_same_repository_pull_request_brings_its_head(name: str) -> None:
    event = parsed(name)
    assert event == ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=REPO,
        commit_sha="e1f2a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4",
        branch="main",
        pull_number=7,
        head_branch="index-cache",
        head_clone_url=BASE_CLONE,
        from_fork=False,
        delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        sender="octocat",
    )
    assert event.ref_key == "pull/7"


def test_pull_request_from_a_fork_is_marked_and_cloned_from_the_fork() -> None:
    event = parsed("pull_request.opened.fork")
    assert isinstance(event, ForgeEvent)
    assert event.from_fork and event.pull_number == 12
    assert event.repo == REPO  # the repository the webhook is on, never the fork
    assert event.head_clone_url == "https://github.com/contrib-dev/widgets.git"
    assert (event.branch, event.head_branch) == ("main", "main")


def test_pull_request_whose_fork_was_deleted_is_still_a_fork() -> None:
    event = parsed("pull_request.synchronize.fork_deleted")
    assert isinstance(event, ForgeEvent)
    assert event.from_fork
    assert event.head_clone_url == BASE_CLONE  # refs/pull/12/head lives on in the base repository
    assert event.commit_sha == "4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2"


@pytest.mark.parametrize(
    "name", ["pull_request.closed", "pull_request.labeled", "pull_request_review.submitted", "issue_comment.created"]
)
def test_deliveries_without_a_new_head_are_ignored(name: str) -> None:
    assert isinstance(parsed(name), Ignored)


def test_an_event_the_bridge_does_not_know_is_ignored() -> None:
    body = fixture("push.branch")
    assert isinstance(forge_for_webhooks.parse(webhook_headers("check_suite", body, SECRET), body), Ignored)


def _drop_after(payload: dict[str, Any]) -> None:
    del payload["after"]


def _bad_head_sha(payload: dict[str, Any]) -> None:
    payload["pull_request"]["head"]["sha"] = "HEAD; rm -rf /"


def _head_repo_string(payload: dict[str, Any]) -> None:
    payload["pull_request"]["head"]["repo"] = "contrib-dev/widgets"


def _no_repository(payload: dict[str, Any]) -> None:
    del payload["repository"]


@pytest.mark.parametrize(
    ("event", "body", "words"),
    [
        ("push", b"{not json", "not JSON"),
        ("push", b"[1, 2]", "not an object"),
        ("push", b"[" * 100_000, "not JSON"),
        ("push", edited("push.branch", _drop_after), "after"),
        ("push", edited("push.branch", _no_repository), "repository"),
        ("pull_request", edited("pull_request.opened", _bad_head_sha), "pull_request.head.sha"),
        ("pull_request", edited("pull_request.opened", _head_repo_string), "pull_request.head.repo"),
    ],
)
def test_unreadable_deliveries_say_what_is_wrong(event: str, body: bytes, words: str) -> None:
    with pytest.raises(WebhookError, match=words):
        forge_for_webhooks.parse(webhook_headers(event, body, SECRET), body)


def test_a_delivery_without_an_event_header_is_unreadable() -> None:
    headers, body = delivery("push.branch", SECRET)
    del headers["X-GitHub-Event"]
    with pytest.raises(WebhookError, match="X-GitHub-Event"):
        forge_for_webhooks.parse(headers, body)


# --- the API ------------------------------------------------------------------------------------
@pytest.fixture
async def fake() -> AsyncIterator[FakeForge]:
    server = install(FakeForge(token="ghp-test-token"))
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def github(fake: FakeForge) -> AsyncIterator[GitHubForge]:
    forge = GitHubForge(fake.url, fake.token)
    yield forge
    await forge.close()


async def test_api_calls_carry_the_token_and_api_version(fake: FakeForge, github: GitHubForge) -> None:
    fake.branches["octo-org/widgets"] = {"main": SHA}
    await github.branches(REPO)
    call = fake.calls[-1]
    assert call.headers["Authorization"] == "Bearer ghp-test-token"
    assert call.headers["Accept"] == "application/vnd.github+json"
    assert call.headers["X-GitHub-Api-Version"] == "2022-11-28"
    assert call.headers["User-Agent"]
    assert github.kind is ForgeKind.GITHUB
    assert "ghp-test-token" not in repr(github)


async def test_read_file_gives_the_raw_bytes_at_the_commit(fake: FakeForge, github: GitHubForge) -> None:
    content = "jobs:\n  test:\n    script: echo héllo\n".encode()
    fake.files[("octo-org/widgets", SHA, ".orchestrator.yaml")] = content
    fake.files[("octo-org/widgets", "1" * 40, ".orchestrator.yaml")] = b"another commit"
    assert await github.read_file(REPO, ".orchestrator.yaml", SHA) == content
    call = fake.calls[-1]
    assert call.path == "/repos/octo-org/widgets/contents/.orchestrator.yaml"
    assert call.query == {"ref": SHA}
    assert call.headers["Accept"] == "application/vnd.github.raw+json"


async def test_read_file_quotes_awkward_paths(fake: FakeForge, github: GitHubForge) -> None:
    path = "ci dir/jobs #1?.yaml"
    fake.files[("octo-org/widgets", SHA, path)] = b"jobs: {}\n"
    assert await github.read_file(REPO, path, SHA) == b"jobs: {}\n"
    assert fake.calls[-1].query == {"ref": SHA}


async def test_read_file_of_a_missing_file_or_a_directory_is_none(fake: FakeForge, github: GitHubForge) -> None:
    fake.files[("octo-org/widgets", SHA, "ci/jobs.yaml")] = b"jobs: {}\n"
    assert await github.read_file(REPO, ".orchestrator.yaml", SHA) is None
    assert await github.read_file(REPO, "ci", SHA) is None
    assert fake.calls[-1].headers["Accept"] == "application/vnd.github.raw+json"


@pytest.mark.parametrize(
    ("state", "github_state"),
    [
        (StatusState.PENDING, "pending"),
        (StatusState.RUNNING, "pending"),
        (StatusState.SUCCESS, "success"),
        (StatusState.FAILURE, "failure"),
        (StatusState.ERROR, "error"),
        (StatusState.CANCELED, "error"),
    ],
)
async def test_status_states_map_onto_githubs(
    fake: FakeForge, github: GitHubForge, state: StatusState, github_state: str
) -> None:
    await github.set_status(
        REPO, SHA, CommitStatus(state, "orchestrator/test", "a description", "http://host-1:8080/jobs/x/log")
    )
    recorded = fake.statuses[-1]
    assert (recorded.repo, recorded.sha, recorded.state) == ("octo-org/widgets", SHA, github_state)
    assert (recorded.context, recorded.description, recorded.target_url) == (
        "orchestrator/test",
        "a description",
        "http://host-1:8080/jobs/x/log",
    )
    call = fake.calls[-1]
    assert (call.method, call.path) == ("POST", f"/repos/octo-org/widgets/statuses/{SHA}")


async def test_status_description_is_cut_to_githubs_140_characters(fake: FakeForge, github: GitHubForge) -> None:
    long = "jobs file line 3: " + "a very long problem\nspread over lines " * 20
    await github.set_status(REPO, SHA, CommitStatus(StatusState.ERROR, "orchestrator", long))
    description = fake.statuses[-1].description
    assert len(description) <= 140 and description.endswith("…") and "\n" not in description
    assert description.startswith("jobs file line 3: a very long problem spread over lines")
    assert shorten("x" * 140) == "x" * 140


async def test_status_without_a_link_sends_no_target_url(fake: FakeForge, github: GitHubForge) -> None:
    await github.set_status(REPO, SHA, CommitStatus(StatusState.PENDING, "orchestrator/test", "queued"))
    assert "target_url" not in json.loads(fake.calls[-1].body)
    assert fake.statuses_for(SHA, "orchestrator/test") == ["pending"]


async def test_a_status_github_refuses_is_not_retried(fake: FakeForge, github: GitHubForge) -> None:
    with pytest.raises(ForgeApiError) as refused:
        await github.set_status(REPO, "not-a-commit", CommitStatus(StatusState.SUCCESS, "orchestrator/test", "ok"))
    assert (refused.value.status, refused.value.retry_after_s) == (422, None)


async def test_branches_follow_pagination_to_the_last_page(fake: FakeForge, github: GitHubForge) -> None:
    heads = {f"feature/{n:03d}": f"{n:040x}" for n in range(250)}
    fake.branches["octo-org/widgets"] = heads
    moved = "feature/249"
    heads[moved] = "f" * 40
    found = await github.branches(REPO)
    assert {head.name: head.commit_sha for head in found} == heads
    listing = [call for call in fake.calls if call.path == "/repos/octo-org/widgets/branches"]
    assert len(listing) == 3  # 100 a page
    assert listing[0].query == {"per_page": "100"}


async def test_open_pulls_name_their_heads_and_forks(fake: FakeForge, github: GitHubForge) -> None:
    fake.branches["octo-org/widgets"] = {"main": SHA}
    fake.pulls["octo-org/widgets"] = [
        Pull(7, "e" * 40, "main", "index-cache", "octo-org/widgets"),
        Pull(12, "4" * 40, "main", "main", "contrib-dev/widgets"),
        Pull(13, "5" * 40, "main", "patch-1", ""),  # its fork was deleted
        Pull(3, "3" * 40, "main", "old", "octo-org/widgets", state="closed"),
    ]
    pulls = {pull.number: pull for pull in await github.open_pulls(REPO)}
    assert sorted(pulls) == [7, 12, 13]
    assert (pulls[7].commit_sha, pulls[7].base_branch, pulls[7].head_branch, pulls[7].from_fork) == (
        "e" * 40,
        "main",
        "index-cache",
        False,
    )
    assert pulls[7].head_clone_url == BASE_CLONE
    assert pulls[12].from_fork and pulls[12].head_clone_url == "https://github.com/contrib-dev/widgets.git"
    assert pulls[13].from_fork and pulls[13].head_clone_url == BASE_CLONE
    assert fake.calls[-1].query == {"state": "open", "per_page": "100"}


async def test_many_open_pulls_over_several_pages(fake: FakeForge, github: GitHubForge) -> None:
    fake.pulls["octo-org/widgets"] = [
        Pull(n, f"{n:040x}", "main", f"topic-{n}", "octo-org/widgets") for n in range(1, 206)
    ]
    assert [pull.number for pull in await github.open_pulls(REPO)] == list(range(1, 206))


async def test_an_unknown_repository_or_a_bad_token_is_not_retried(fake: FakeForge, github: GitHubForge) -> None:
    with pytest.raises(ForgeApiError) as missing:
        await github.branches(Repo("octo-org", "nothing-here", "https://github.com/octo-org/nothing-here.git"))
    assert (missing.value.status, missing.value.retry_after_s) == (404, None)
    fake.branches["octo-org/widgets"] = {"main": SHA}
    intruder = GitHubForge(fake.url, "ghp-wrong")
    try:
        with pytest.raises(ForgeApiError) as denied:
            await intruder.branches(REPO)
        assert (denied.value.status, denied.value.retry_after_s) == (401, None)
    finally:
        await intruder.close()


async def test_server_errors_and_rate_limits_say_when_to_try_again(fake: FakeForge, github: GitHubForge) -> None:
    fake.branches["octo-org/widgets"] = {"main": SHA}
    status = CommitStatus(StatusState.SUCCESS, "orchestrator/test", "passed")

    fake.fail_next(status=502)
    with pytest.raises(ForgeApiError) as bad_gateway:
        await github.set_status(REPO, SHA, status)
    assert (bad_gateway.value.status, bad_gateway.value.retry_after_s) == (502, DEFAULT_RETRY_S)

    fake.fail_next(status=429, retry_after="7")
    with pytest.raises(ForgeApiError) as too_many:
        await github.branches(REPO)
    assert (too_many.value.status, too_many.value.retry_after_s) == (429, 7.0)

    reset = int(time.time()) + 30
    fake.fail_next(status=403, headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})
    with pytest.raises(ForgeApiError) as primary:
        await github.read_file(REPO, ".orchestrator.yaml", SHA)
    assert primary.value.status == 403 and 25 <= (primary.value.retry_after_s or 0) <= 31

    fake.fail_next(reset=True)  # on a POST: aiohttp itself tries an idempotent request once more
    with pytest.raises(ForgeApiError) as dropped:
        await github.set_status(REPO, SHA, status)
    assert (dropped.value.status, dropped.value.retry_after_s) == (None, DEFAULT_RETRY_S)

    await github.set_status(REPO, SHA, status)  # and then it works
    assert fake.statuses_for(SHA) == ["success"]


async def test_repository_is_looked_up_by_name(fake: FakeForge, github: GitHubForge) -> None:
    fake.files[("octo-org/gadgets", SHA, ".orchestrator.yaml")] = b"jobs: {}\n"
    repo = await github.repository("octo-org/gadgets")
    assert repo == Repo("octo-org", "gadgets", "https://github.com/octo-org/gadgets.git")
    assert repo.project_id is None
    call = fake.calls[-1]
    assert (call.method, call.path) == ("GET", "/repos/octo-org/gadgets")
    assert call.headers["Authorization"] == "Bearer ghp-test-token"
    fake.branches["octo-org/widgets"] = {"main": SHA}
    assert await github.repository("octo-org/widgets") == REPO


async def test_repository_takes_the_canonical_name_from_the_answer(
    fake: FakeForge, github: GitHubForge, monkeypatch: pytest.MonkeyPatch
) -> None:
    answer = {
        "id": 1296269,
        "node_id": "MDEwOlJlcG9zaXRvcnkxMjk2MjY5",
        "name": "Hello-World",
        "full_name": "octocat/Hello-World",
        "owner": {"login": "octocat", "id": 1, "type": "User"},
        "private": False,
        "clone_url": "https://github.com/octocat/Hello-World.git",
        "ssh_url": "git@github.com:octocat/Hello-World.git",
        "default_branch": "master",
    }

    async def get_json(path: str, **_: Any) -> Any:
        return answer

    monkeypatch.setattr(github.api, "get_json", get_json)
    assert await github.repository("OctoCat/hello-world") == Repo(
        "octocat", "Hello-World", "https://github.com/octocat/Hello-World.git"
    )
    answer["owner"] = {"login": 42}
    with pytest.raises(ForgeApiError, match=r"owner\.login") as odd:
        await github.repository("octocat/Hello-World")
    assert (odd.value.status, odd.value.retry_after_s) == (200, None)
    del answer["owner"]
    with pytest.raises(ForgeApiError, match="owner"):
        await github.repository("octocat/Hello-World")


async def test_an_unknown_repository_is_a_404_that_says_so(fake: FakeForge, github: GitHubForge) -> None:
    with pytest.raises(ForgeApiError, match="does not exist or the token cannot see it") as missing:
        await github.repository("octo-org/nothing-here")
    assert (missing.value.status, missing.value.retry_after_s) == (404, None)
    for bad in ("no-slash", "a/b/c", "/name", "owner/"):
        with pytest.raises(ForgeApiError, match="not owner/name") as refused:
            await github.repository(bad)
        assert refused.value.retry_after_s is None
    assert fake.calls[-1].path == "/repos/octo-org/nothing-here"  # nothing asked for the bad names


async def test_repository_lookup_failing_on_the_server_can_be_retried(fake: FakeForge, github: GitHubForge) -> None:
    fake.branches["octo-org/widgets"] = {"main": SHA}
    fake.fail_next(status=500)
    with pytest.raises(ForgeApiError) as failed:
        await github.repository("octo-org/widgets")
    assert (failed.value.status, failed.value.retry_after_s) == (500, DEFAULT_RETRY_S)
    assert await github.repository("octo-org/widgets") == REPO


async def test_a_failed_listing_raises_and_the_next_one_is_whole(fake: FakeForge, github: GitHubForge) -> None:
    fake.branches["octo-org/widgets"] = {f"b{n}": f"{n:040x}" for n in range(150)}
    fake.fail_next(status=500, path_prefix="/repos/octo-org/widgets/branches")
    with pytest.raises(ForgeApiError):
        await github.branches(REPO)
    assert len(await github.branches(REPO)) == 150
