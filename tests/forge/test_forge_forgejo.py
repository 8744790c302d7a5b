"""Forgejo/Gitea: webhook fixtures parsed into the bridge's events, signatures, hostile
bodies, and the REST API against the fake forge (files, statuses, paginated listings,
typed errors)."""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator.forge.base import (
    BranchHead,
    CommitStatus,
    EventKind,
    Forge,
    ForgeEvent,
    ForgeKind,
    Ignored,
    Ping,
    PullHead,
    Repo,
    StatusState,
    WebhookError,
)
from orchestrator.forge.forgejo import DESCRIPTION_LIMIT, FORGE_STATES, ForgejoForge
from orchestrator.forge.http import DEFAULT_RETRY_S, ForgeApiError
from tests.support.fakeforge import FakeForge, Pull
from tests.support.fakeforge import forgejo as fake_forgejo

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "forge" / "forgejo"
SECRET = "It's a Secret to Everybody"
BASE_CLONE = "http://localhost:3000/forgejo/webhooks.git"
FORK_CLONE = "http://localhost:3000/alice/webhooks.git"
WEBHOOKS = Repo(owner="forgejo", name="webhooks", clone_url=BASE_CLONE)
SHA = "bffeb74224043ba2feb48d137756c8a9331c449a"
OTHER_SHA = "28e1879d029cb852e4844d9c718537df08844e03"

forge = ForgejoForge("http://forge.invalid", "unused")  # webhook methods are pure


def fixture(name: str) -> tuple[dict[str, str], bytes]:
    headers = json.loads((FIXTURES / f"{name}.headers.json").read_text())
    return headers, (FIXTURES / f"{name}.json").read_bytes()


def sign(headers: dict[str, str], body: bytes, secret: str = SECRET) -> dict[str, str]:
    """The signature headers Forgejo (or Gitea) adds: the same hex HMAC under each prefix."""
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    signed = dict(headers)
    for prefix in ("Forgejo", "Gitea", "Gogs"):
        if f"X-{prefix}-Event" in headers:
            signed[f"X-{prefix}-Signature"] = signature
    signed["X-Hub-Signature-256"] = "sha256=" + signature
    return signed


def parse(name: str, *, body: dict[str, Any] | None = None) -> Any:
    headers, raw = fixture(name)
    return forge.parse(headers, raw if body is None else json.dumps(body).encode())


def payload(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_bytes())


ALL_FIXTURES = sorted(path.name.removesuffix(".headers.json") for path in FIXTURES.glob("*.headers.json"))


def test_forge_implements_the_protocol() -> None:
    implementation: Forge = ForgejoForge("https://codeberg.org", "t")
    assert implementation.kind is ForgeKind.FORGEJO


def test_every_fixture_has_a_body_and_headers_without_signatures() -> None:
    assert len(ALL_FIXTURES) >= 10
    for name in ALL_FIXTURES:
        headers, body = fixture(name)
        assert json.loads(body), name
        assert not [h for h in headers if "signature" in h.lower()], name
        assert headers.get("X-Gitea-Event"), name


# --- parse: pushes ----------------------------------------------------------------------


def test_push_to_a_branch_is_a_push_event() -> None:
    event = parse("push_branch")
    assert event == ForgeEvent(
        kind=EventKind.PUSH,
        repo=WEBHOOKS,
        commit_sha=SHA,
        branch="develop",
        tag=None,
        delivery_id="f6266f16-1bf3-46a5-9ea4-602e06ead473",
        sender="forgejo",
    )
    assert event.ref_key == "branch/develop"


def test_push_from_gitea_with_only_gitea_headers() -> None:
    headers, _ = fixture("push_branch_gitea")
    assert not [name for name in headers if name.startswith("X-Forgejo")]
    event = parse("push_branch_gitea")
    assert isinstance(event, ForgeEvent)
    assert (event.kind, event.repo, event.commit_sha, event.branch) == (
        EventKind.PUSH,
        Repo("gitea", "webhooks", "http://localhost:3000/gitea/webhooks.git"),
        SHA,
        "develop",
    )
    assert event.delivery_id == "f6266f16-1bf3-46a5-9ea4-602e06ead473"


def test_push_creating_a_branch_runs_its_head() -> None:
    event = parse("push_new_branch")
    assert isinstance(event, ForgeEvent)
    assert (event.branch, event.commit_sha, event.tag) == (
        "feature/x",
        "2020558fe2e34debb818a514715839cabd25e778",
        None,
    )


def test_push_of_an_annotated_tag_runs_the_tagged_commit_not_the_tag_object() -> None:
    event = parse("push_tag")
    assert payload("push_tag")["after"] != SHA  # `after` is the tag object
    assert event == ForgeEvent(
        kind=EventKind.PUSH,
        repo=WEBHOOKS,
        commit_sha=SHA,
        branch=None,
        tag="v1.0.0",
        delivery_id="9b2f61d4-3cf0-4d39-8d0a-5a6f3e2b7c11",
        sender="forgejo",
    )
    assert event.ref_key == "tag/v1.0.0"


def test_push_of_a_lightweight_tag_without_head_commit_uses_after() -> None:
    body = payload("push_tag")
    body["head_commit"] = None
    body["after"] = SHA
    event = parse("push_tag", body=body)
    assert isinstance(event, ForgeEvent) and (event.tag, event.commit_sha) == ("v1.0.0", SHA)


@pytest.mark.parametrize("name", ["push_tag_delete", "push_branch_delete", "delete_branch"])
def test_deletions_are_ignored(name: str) -> None:
    outcome = parse(name)
    assert isinstance(outcome, Ignored), outcome


def test_test_delivery_is_a_ping() -> None:
    body = payload("push_test_delivery")
    assert body["before"] == body["after"]
    assert parse("push_test_delivery") == Ping()


def test_test_delivery_of_an_empty_repository_is_a_ping_not_a_deletion() -> None:
    body = payload("push_test_delivery")
    body["before"] = body["after"] = body["head_commit"]["id"] = "0" * 40
    assert parse("push_test_delivery", body=body) == Ping()


def test_push_to_a_ref_that_is_neither_branch_nor_tag_is_ignored() -> None:
    body = payload("push_branch")
    body["ref"] = "refs/notes/commits"
    assert isinstance(parse("push_branch", body=body), Ignored)


def test_sha256_repositories_and_upper_case_shas_are_accepted() -> None:
    body = payload("push_branch")
    body["after"] = "AB" * 32
    event = parse("push_branch", body=body)
    assert isinstance(event, ForgeEvent) and event.commit_sha == "ab" * 32


# --- parse: pull requests ------------------------------------------------------------------


def test_pull_request_opened_from_a_branch_of_the_same_repository() -> None:
    event = parse("pull_request_opened")
    assert event == ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=WEBHOOKS,
        commit_sha="36b5813240a9d2daa29b05046d56a53e18f39a3e",
        branch="main",
        pull_number=3,
        head_branch="docs-fix",
        head_clone_url=BASE_CLONE,
        from_fork=False,
        delivery_id="a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a01",
        sender="forgejo",
    )
    assert event.ref_key == "pull/3"


@pytest.mark.parametrize("name", ["pull_request_synchronized", "pull_request_reopened"])
def test_new_commits_and_reopening_run_the_new_head(name: str) -> None:
    event = parse(name)
    assert isinstance(event, ForgeEvent)
    assert (event.kind, event.pull_number, event.commit_sha, event.branch, event.head_branch, event.from_fork) == (
        EventKind.PULL_REQUEST,
        3,
        "7d9f0c2b1e4a5f6d8c3b2a1908f7e6d5c4b3a291",
        "main",
        "docs-fix",
        False,
    )
    assert event.delivery_id == fixture(name)[0]["X-Forgejo-Delivery"]


def test_synchronized_is_spelled_with_a_d_and_typed_pull_request_sync() -> None:
    headers, _ = fixture("pull_request_synchronized")
    assert payload("pull_request_synchronized")["action"] == "synchronized"
    assert (headers["X-Forgejo-Event"], headers["X-Forgejo-Event-Type"]) == ("pull_request", "pull_request_sync")


def test_pull_request_from_a_fork() -> None:
    event = parse("pull_request_fork_opened")
    assert event == ForgeEvent(
        kind=EventKind.PULL_REQUEST,
        repo=WEBHOOKS,
        commit_sha="c0ffee00c0ffee00c0ffee00c0ffee00c0ffee01",
        branch="main",
        pull_number=4,
        head_branch="fix-typo",
        head_clone_url=FORK_CLONE,
        from_fork=True,
        delivery_id="a1b2c3d4-0006-4e5f-8a9b-0c1d2e3f4a06",
        sender="alice",
    )


def test_pull_request_whose_fork_was_deleted_is_from_a_fork_cloned_from_the_base() -> None:
    body = payload("pull_request_fork_opened")
    body["pull_request"]["head"].update(repo=None, repo_id=-1, ref="refs/pull/4/head")
    event = parse("pull_request_fork_opened", body=body)
    assert isinstance(event, ForgeEvent)
    assert (event.from_fork, event.head_clone_url, event.head_branch) == (True, BASE_CLONE, "fix-typo")


def test_agit_pull_request_counts_as_from_a_fork() -> None:
    event = parse("pull_request_agit_opened")
    assert isinstance(event, ForgeEvent)
    assert (event.pull_number, event.from_fork, event.head_clone_url, event.head_branch) == (
        7,
        True,
        BASE_CLONE,
        "refs/pull/7/head",
    )


@pytest.mark.parametrize(
    "name", ["pull_request_closed", "pull_request_merged", "pull_request_label_updated", "issue_comment_created"]
)
def test_closed_merged_labelled_and_commented_pull_requests_are_ignored(name: str) -> None:
    outcome = parse(name)
    assert isinstance(outcome, Ignored), outcome


def test_ignored_pull_request_actions_are_not_validated_further() -> None:
    body = {"action": "label_cleared", "pull_request": "not an object"}
    assert isinstance(parse("pull_request_label_updated", body=body), Ignored)


def test_synchronized_on_a_closed_pull_request_is_ignored() -> None:
    body = payload("pull_request_synchronized")
    body["pull_request"]["state"] = "closed"
    assert isinstance(parse("pull_request_synchronized", body=body), Ignored)


@pytest.mark.parametrize("event", ["issues", "release", "create", "repository", "wiki", "pull_request_approved"])
def test_other_events_are_ignored(event: str) -> None:
    headers, body = fixture("push_branch")
    headers = {**headers, "X-Forgejo-Event": event, "X-Gitea-Event": event}
    assert isinstance(forge.parse(headers, body), Ignored)


EXPECTED = {
    "push_branch": ForgeEvent,
    "push_branch_gitea": ForgeEvent,
    "push_new_branch": ForgeEvent,
    "push_tag": ForgeEvent,
    "push_tag_delete": Ignored,
    "push_branch_delete": Ignored,
    "delete_branch": Ignored,
    "push_test_delivery": Ping,
    "pull_request_opened": ForgeEvent,
    "pull_request_synchronized": ForgeEvent,
    "pull_request_reopened": ForgeEvent,
    "pull_request_closed": Ignored,
    "pull_request_merged": Ignored,
    "pull_request_fork_opened": ForgeEvent,
    "pull_request_agit_opened": ForgeEvent,
    "pull_request_label_updated": Ignored,
    "issue_comment_created": Ignored,
}


def test_every_fixture_has_an_expected_outcome_and_is_authentic() -> None:
    assert sorted(EXPECTED) == ALL_FIXTURES
    for name, outcome in EXPECTED.items():
        headers, body = fixture(name)
        assert isinstance(forge.parse(headers, body), outcome), name
        assert forge.authentic(sign(headers, body), body, [SECRET]), name
        assert forge.delivery_id(headers) == headers["X-Gitea-Delivery"], name
        assert forge.repository_of(body) in {"forgejo/webhooks", "gitea/webhooks"}, name


def test_header_names_are_case_insensitive() -> None:
    headers, body = fixture("pull_request_opened")
    lowered = {name.lower(): value for name, value in sign(headers, body).items()}
    assert forge.authentic(lowered, body, [SECRET])
    assert forge.delivery_id(lowered) == "a1b2c3d4-0001-4e5f-8a9b-0c1d2e3f4a01"
    assert isinstance(forge.parse(lowered, body), ForgeEvent)


# --- signatures -----------------------------------------------------------------------------


def test_signature_with_the_right_secret_is_authentic() -> None:
    headers, body = fixture("push_branch")
    assert forge.authentic(sign(headers, body), body, [SECRET])


def test_signature_with_a_wrong_secret_is_not() -> None:
    headers, body = fixture("push_branch")
    assert not forge.authentic(sign(headers, body, "guess"), body, [SECRET])


def test_missing_signature_is_not_authentic() -> None:
    headers, body = fixture("push_branch")
    assert not forge.authentic(headers, body, [SECRET])
    assert not forge.authentic({**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64}, body, [SECRET])


def test_second_secret_in_the_list_is_accepted() -> None:
    headers, body = fixture("push_branch")
    assert forge.authentic(sign(headers, body, "new secret"), body, ["old secret", "new secret"])


def test_gitea_signature_alone_is_checked() -> None:
    headers, body = fixture("push_branch_gitea")
    signed = sign(headers, body)
    assert "X-Forgejo-Signature" not in signed and "X-Gitea-Signature" in signed
    assert forge.authentic(signed, body, [SECRET])
    assert not forge.authentic(sign(headers, body, "guess"), body, [SECRET])


def test_forgejo_signature_alone_is_checked() -> None:
    headers, body = fixture("push_branch")
    signed = sign(headers, body)
    del signed["X-Gitea-Signature"]
    assert forge.authentic(signed, body, [SECRET])


def test_a_bad_gitea_signature_beside_a_good_forgejo_one_is_not_authentic() -> None:
    headers, body = fixture("push_branch")
    signed = sign(headers, body)
    signed["X-Gitea-Signature"] = sign(headers, body, "guess")["X-Gitea-Signature"]
    assert not forge.authentic(signed, body, [SECRET])


def test_signature_of_another_body_is_not_authentic() -> None:
    headers, body = fixture("push_branch")
    assert not forge.authentic(sign(headers, body), body + b" ", [SECRET])


@pytest.mark.parametrize("signature", ["", "sha256=abc", "é" * 64, "z" * 64, "0" * 63])
def test_malformed_signatures_are_not_authentic(signature: str) -> None:
    headers, body = fixture("push_branch")
    assert not forge.authentic({**headers, "X-Forgejo-Signature": signature}, body, [SECRET])


def test_unsigned_delivery_does_not_match_an_empty_secret() -> None:
    headers, body = fixture("push_branch")
    empty_key_signature = hmac.new(b"", body, hashlib.sha256).hexdigest()
    signed = {**headers, "X-Forgejo-Signature": empty_key_signature}
    assert not forge.authentic(signed, body, [""])
    assert not forge.authentic(sign(headers, body), body, [])


def test_upper_case_hex_signature_is_accepted() -> None:
    headers, body = fixture("push_branch")
    signed = {
        name: value.upper() if name.endswith("-Signature") else value for name, value in sign(headers, body).items()
    }
    assert forge.authentic(signed, body, [SECRET])


# --- hostile and odd bodies -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{", "not JSON"),
        (b"", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not JSON"),
        (b'{"n": ' + b"1" * 5000 + b"}", "not JSON"),
        (b"[1, 2]", "not an object"),
        (b'"push"', "not an object"),
        (b"payload=%7B%7D", "application/json"),
    ],
)
def test_malformed_bodies_are_webhook_errors_with_the_reason(body: bytes, reason: str) -> None:
    headers, _ = fixture("push_branch")
    with pytest.raises(WebhookError, match=reason):
        forge.parse(headers, body)


def _edit(name: str, path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(payload(name))
    *parents, last = path.split(".")
    target = body
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return body


@pytest.mark.parametrize(
    ("name", "path", "value", "field"),
    [
        ("push_branch", "after", "not-a-sha", "after"),
        ("push_branch", "after", 12345, "after"),
        ("push_branch", "ref", KeyError, "ref"),
        ("push_branch", "repository", None, "repository"),
        ("push_branch", "repository.clone_url", ["http://x"], "repository.clone_url"),
        ("push_branch", "repository.clone_url", "file:///etc/passwd", "repository.clone_url"),
        ("push_branch", "repository.name", "../../etc", "repository.name"),
        ("push_branch", "repository.owner", {"id": 1}, "repository.owner"),
        ("push_branch", "repository.owner.login", "a/b", "repository.owner"),
        ("push_branch", "repository.id", "140", "repository.id"),
        ("pull_request_opened", "pull_request.head.sha", KeyError, "pull_request.head.sha"),
        ("pull_request_opened", "pull_request.head.sha", "", "pull_request.head.sha"),
        ("pull_request_opened", "pull_request.number", "3", "pull_request.number"),
        ("pull_request_opened", "pull_request.number", True, "pull_request.number"),
        ("pull_request_opened", "pull_request.number", 0, "pull_request.number"),
        ("pull_request_opened", "pull_request.base", KeyError, "pull_request.base"),
        ("pull_request_opened", "pull_request.head.repo.clone_url", 7, "pull_request.head.repo.clone_url"),
        ("pull_request_opened", "pull_request", None, "pull_request"),
        ("pull_request_opened", "action", 1, "action"),
    ],
)
def test_odd_payloads_are_webhook_errors_naming_the_field(name: str, path: str, value: Any, field: str) -> None:
    with pytest.raises(WebhookError) as raised:
        parse(name, body=_edit(name, path, value))
    assert str(raised.value).startswith(field), str(raised.value)


def test_unknown_fields_are_ignored() -> None:
    body = payload("push_branch")
    body["something_new"] = {"nested": [1, 2, 3]}
    body["repository"]["new_flag"] = True
    assert isinstance(parse("push_branch", body=body), ForgeEvent)


def test_missing_event_header_is_a_webhook_error() -> None:
    _, body = fixture("push_branch")
    with pytest.raises(WebhookError, match="X-Forgejo-Event"):
        forge.parse({"Content-Type": "application/json"}, body)


def test_forgejo_and_gitea_event_headers_must_agree() -> None:
    headers, body = fixture("push_branch")
    with pytest.raises(WebhookError, match="disagree"):
        forge.parse({**headers, "X-Gitea-Event": "pull_request"}, body)


def test_delivery_id_from_either_header_or_none() -> None:
    assert forge.delivery_id({"X-Forgejo-Delivery": "abc"}) == "abc"
    assert forge.delivery_id({"X-Gitea-Delivery": "def"}) == "def"
    assert forge.delivery_id({"X-GitHub-Delivery": "ghi"}) is None
    assert forge.delivery_id({}) is None
    assert forge.delivery_id({"X-Forgejo-Delivery": "abc", "X-Gitea-Delivery": "xyz"}) == "abc"
    headers, body = fixture("push_branch")
    with pytest.raises(WebhookError, match="Delivery"):
        forge.parse({**headers, "X-Gitea-Delivery": "another"}, body)


def test_repository_of_names_the_repository_before_authentication() -> None:
    _, body = fixture("pull_request_fork_opened")
    assert forge.repository_of(body) == "forgejo/webhooks"  # the base, where the webhook is
    assert forge.repository_of(b'{"repository": {"owner": {"login": "o"}, "name": "n"}}') == "o/n"
    assert forge.repository_of(b'{"package": {}}') is None
    assert forge.repository_of(b'{"repository": "x"}') is None
    with pytest.raises(WebhookError):
        forge.repository_of(b"not json")


# --- the API against the fake forge ------------------------------------------------------------


@pytest.fixture
async def fake() -> AsyncIterator[FakeForge]:
    fake = FakeForge()
    fake_forgejo.install(fake)
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def api(fake: FakeForge) -> AsyncIterator[ForgejoForge]:
    client = ForgejoForge(fake.url, fake.token)
    yield client
    await client.close()


async def test_read_file_at_the_exact_commit(fake: FakeForge, api: ForgejoForge) -> None:
    fake.files[("forgejo/webhooks", SHA, ".ci/jobs.yml")] = b"jobs: {}\n"
    assert await api.read_file(WEBHOOKS, ".ci/jobs.yml", SHA) == b"jobs: {}\n"
    call = fake.calls[-1]
    assert (call.method, call.path) == ("GET", "/api/v1/repos/forgejo/webhooks/raw/.ci/jobs.yml")
    assert call.query == {"ref": SHA}
    assert call.headers["Authorization"] == f"token {fake.token}"


async def test_read_file_absent_at_that_commit_is_none(fake: FakeForge, api: ForgejoForge) -> None:
    fake.files[("forgejo/webhooks", OTHER_SHA, ".ci/jobs.yml")] = b"jobs: {}\n"
    assert await api.read_file(WEBHOOKS, ".ci/jobs.yml", SHA) is None
    assert fake.calls[-1].query == {"ref": SHA}


async def test_read_file_quotes_the_path(fake: FakeForge, api: ForgejoForge) -> None:
    fake.files[("forgejo/webhooks", SHA, "ci dir/jobs#1?.yml")] = b"x"
    assert await api.read_file(WEBHOOKS, "ci dir/jobs#1?.yml", SHA) == b"x"
    assert fake.calls[-1].query == {"ref": SHA}


@pytest.mark.parametrize(
    ("state", "forge_state"),
    [
        (StatusState.PENDING, "pending"),
        (StatusState.RUNNING, "pending"),
        (StatusState.SUCCESS, "success"),
        (StatusState.FAILURE, "failure"),
        (StatusState.ERROR, "error"),
        (StatusState.CANCELED, "error"),
    ],
)
async def test_set_status_maps_every_state(
    fake: FakeForge, api: ForgejoForge, state: StatusState, forge_state: str
) -> None:
    status = CommitStatus(
        state=state,
        context="orchestrator/test",
        description="running on host-1",
        target_url="https://ci.example.org/jobs/1/log",
    )
    await api.set_status(WEBHOOKS, SHA, status)
    recorded = fake.statuses[-1]
    assert (
        recorded.repo,
        recorded.sha,
        recorded.state,
        recorded.context,
        recorded.description,
        recorded.target_url,
    ) == (
        "forgejo/webhooks",
        SHA,
        forge_state,
        "orchestrator/test",
        "running on host-1",
        "https://ci.example.org/jobs/1/log",
    )
    call = fake.calls[-1]
    assert (call.method, call.path) == ("POST", f"/api/v1/repos/forgejo/webhooks/statuses/{SHA}")
    assert json.loads(call.body)["state"] == forge_state


def test_every_state_has_a_forge_state() -> None:
    assert set(FORGE_STATES) == set(StatusState)
    assert set(FORGE_STATES.values()) <= {"pending", "success", "error", "failure", "warning"}


async def test_set_status_cuts_the_description_to_the_limit(fake: FakeForge, api: ForgejoForge) -> None:
    await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.FAILURE, "ci", "x" * 1000))
    description = fake.statuses[-1].description
    assert len(description) == DESCRIPTION_LIMIT and description.endswith("…")
    await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.FAILURE, "ci", "exit 1\n  on\thost-2  "))
    assert fake.statuses[-1].description == "exit 1 on host-2"
    await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.SUCCESS, "ci", "y" * DESCRIPTION_LIMIT))
    assert fake.statuses[-1].description == "y" * DESCRIPTION_LIMIT


async def test_set_status_without_target_url_sends_none(fake: FakeForge, api: ForgejoForge) -> None:
    await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.PENDING, "ci", "queued"))
    assert "target_url" not in json.loads(fake.calls[-1].body)
    assert fake.statuses[-1].target_url is None


async def test_fake_rejects_a_state_the_forge_does_not_have(fake: FakeForge, api: ForgejoForge) -> None:
    with pytest.raises(ForgeApiError) as raised:
        await api.api.request("POST", f"/api/v1/repos/forgejo/webhooks/statuses/{SHA}", json_body={"state": "running"})
    assert (raised.value.status, raised.value.retry_after_s) == (422, None)
    assert fake.statuses == []


async def test_branches_follow_pagination_to_the_end(fake: FakeForge, api: ForgejoForge) -> None:
    heads = {f"branch-{i:03}": f"{i:040x}" for i in range(120)}
    fake.branches["forgejo/webhooks"] = heads
    branches = await api.branches(WEBHOOKS)
    assert sorted(branches, key=lambda b: b.name) == [BranchHead(name, sha) for name, sha in sorted(heads.items())]
    listing = [call for call in fake.calls if call.path.endswith("/branches")]
    assert [call.query["page"] for call in listing] == ["1", "2", "3"]
    assert {call.query["limit"] for call in listing} == {"50"}


async def test_open_pulls_follow_pagination_and_tell_forks(fake: FakeForge, api: ForgejoForge) -> None:
    fake.branches["forgejo/webhooks"] = {"main": OTHER_SHA}
    pulls = [
        Pull(
            number=n,
            head_sha=f"{n:040x}",
            base_branch="main",
            head_branch=f"topic-{n}",
            head_repo="alice/webhooks" if n % 2 else "forgejo/webhooks",
        )
        for n in range(1, 111)
    ]
    pulls += [
        Pull(
            number=200 + n,
            head_sha=f"{n:040x}",
            base_branch="main",
            head_branch="old",
            head_repo="forgejo/webhooks",
            state="closed",
        )
        for n in range(5)
    ]
    fake.pulls["forgejo/webhooks"] = pulls
    result = await api.open_pulls(WEBHOOKS)
    assert len(result) == 110
    by_number = {pull.number: pull for pull in result}
    assert by_number[2] == PullHead(
        number=2,
        commit_sha=f"{2:040x}",
        base_branch="main",
        head_branch="topic-2",
        head_clone_url=f"{fake.url}/forgejo/webhooks.git",
        from_fork=False,
    )
    assert by_number[3] == PullHead(
        number=3,
        commit_sha=f"{3:040x}",
        base_branch="main",
        head_branch="topic-3",
        head_clone_url=f"{fake.url}/alice/webhooks.git",
        from_fork=True,
    )
    listing = [call for call in fake.calls if call.path.endswith("/pulls")]
    assert [call.query["page"] for call in listing] == ["1", "2", "3"]
    assert {call.query["state"] for call in listing} == {"open"}


async def test_fake_paginates_like_forgejo(fake: FakeForge, api: ForgejoForge) -> None:
    fake.branches["forgejo/webhooks"] = {f"b{i:02}": f"{i:040x}" for i in range(75)}
    path = "/api/v1/repos/forgejo/webhooks/branches"
    body, headers = await api.api.request("GET", path, params={"page": "2", "limit": "30"})
    assert [branch["name"] for branch in json.loads(body or b"")] == [f"b{i:02}" for i in range(30, 60)]
    assert headers["X-Total-Count"] == "75"
    links = dict(reversed(part.split("; ")) for part in headers["Link"].split(","))
    assert links['rel="next"'] == f"<{fake.url}{path}?page=3&limit=30>"
    assert links['rel="last"'] == f"<{fake.url}{path}?page=3&limit=30>"
    assert links['rel="prev"'] == f"<{fake.url}{path}?page=1&limit=30>"
    body, headers = await api.api.request("GET", path, params={"limit": "500"})
    assert len(json.loads(body or b"")) == 50  # MAX_RESPONSE_ITEMS


async def test_next_page_is_asked_on_our_own_url_not_the_link_host() -> None:
    """Link URLs are built on the instance's ROOT_URL; the token must not follow them."""
    fake = FakeForge()
    fake_forgejo.install(fake, app_url="http://public-root.invalid/git/")
    await fake.start()
    client = ForgejoForge(fake.url, fake.token)
    try:
        fake.branches["forgejo/webhooks"] = {f"b{i}": f"{i:040x}" for i in range(101)}
        assert len(await client.branches(WEBHOOKS)) == 101
        listing = [call for call in fake.calls if call.path.endswith("/branches")]
        assert [call.query["page"] for call in listing] == ["1", "2", "3"]
    finally:
        await client.close()
        await fake.close()


async def test_empty_listing_is_one_call(fake: FakeForge, api: ForgejoForge) -> None:
    fake.branches["forgejo/webhooks"] = {}
    assert await api.branches(WEBHOOKS) == []
    assert await api.open_pulls(WEBHOOKS) == []
    assert len(fake.calls) == 2


async def test_odd_listing_items_are_api_errors_naming_the_field(fake: FakeForge, api: ForgejoForge) -> None:
    fake.branches["forgejo/webhooks"] = {"main": "not-a-sha"}
    with pytest.raises(ForgeApiError, match=r"0\.commit\.id|commit\.id") as raised:
        await api.branches(WEBHOOKS)
    assert raised.value.retry_after_s is None


async def test_server_error_is_retryable(fake: FakeForge, api: ForgejoForge) -> None:
    fake.fail_next(status=500)
    with pytest.raises(ForgeApiError) as raised:
        await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.PENDING, "ci", "queued"))
    assert (raised.value.status, raised.value.retry_after_s) == (500, DEFAULT_RETRY_S)
    assert fake.statuses == []


async def test_rate_limit_with_retry_after_is_retryable_after_that_long(fake: FakeForge, api: ForgejoForge) -> None:
    fake.fail_next(status=429, retry_after="7")
    with pytest.raises(ForgeApiError) as raised:
        await api.read_file(WEBHOOKS, ".ci/jobs.yml", SHA)
    assert (raised.value.status, raised.value.retry_after_s) == (429, 7.0)
    fake.fail_next(status=403, retry_after="3")
    with pytest.raises(ForgeApiError) as raised:
        await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.PENDING, "ci", "queued"))
    assert (raised.value.status, raised.value.retry_after_s) == (403, 3.0)


async def test_failure_on_a_later_page_is_an_error_not_a_short_list(
    fake: FakeForge, api: ForgejoForge, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.branches["forgejo/webhooks"] = {f"b{i}": f"{i:040x}" for i in range(120)}
    request, sent = api.api.request, 0

    async def second_page_fails(*args: Any, **kwargs: Any) -> Any:
        nonlocal sent
        sent += 1
        if sent == 2:
            fake.fail_next(status=502)
        return await request(*args, **kwargs)

    monkeypatch.setattr(api.api, "request", second_page_fails)
    with pytest.raises(ForgeApiError) as raised:
        await api.branches(WEBHOOKS)
    assert (raised.value.status, raised.value.retry_after_s) == (502, DEFAULT_RETRY_S)


async def test_connection_reset_is_retryable(fake: FakeForge, api: ForgejoForge) -> None:
    # A POST: aiohttp itself tries an idempotent GET once more after a reset.
    fake.fail_next(reset=True)
    with pytest.raises(ForgeApiError) as raised:
        await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.PENDING, "ci", "queued"))
    assert (raised.value.status, raised.value.retry_after_s) == (None, DEFAULT_RETRY_S)
    assert fake.statuses == []


async def test_wrong_token_is_not_retryable(fake: FakeForge) -> None:
    client = ForgejoForge(fake.url, "wrong")
    try:
        with pytest.raises(ForgeApiError) as raised:
            await client.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.PENDING, "ci", "queued"))
        assert (raised.value.status, raised.value.retry_after_s) == (401, None)
    finally:
        await client.close()


@pytest.mark.parametrize("status", [401, 404, 422])
async def test_client_errors_are_not_retryable(fake: FakeForge, api: ForgejoForge, status: int) -> None:
    fake.fail_next(status=status)
    with pytest.raises(ForgeApiError) as raised:
        await api.set_status(WEBHOOKS, SHA, CommitStatus(StatusState.SUCCESS, "ci", "passed"))
    assert (raised.value.status, raised.value.retry_after_s) == (status, None)


async def test_listing_of_an_unknown_repository_is_not_retryable(api: ForgejoForge) -> None:
    with pytest.raises(ForgeApiError) as raised:
        await api.open_pulls(Repo("nobody", "nothing", "http://x/nobody/nothing.git"))
    assert (raised.value.status, raised.value.retry_after_s) == (404, None)


# --- looking a repository up by name ----------------------------------------------------------


async def test_repository_is_looked_up_by_name(fake: FakeForge, api: ForgejoForge) -> None:
    fake.files[("forgejo/webhooks", SHA, ".ci/jobs.yml")] = b"jobs: {}\n"
    repo = await api.repository("forgejo/webhooks")
    assert repo == Repo(owner="forgejo", name="webhooks", clone_url=f"{fake.url}/forgejo/webhooks.git")
    assert repo.project_id is None
    call = fake.calls[-1]
    assert (call.method, call.path) == ("GET", "/api/v1/repos/forgejo/webhooks")
    assert call.headers["Authorization"] == f"token {fake.token}"
    fake.pulls["alice/webhooks"] = []
    assert (await api.repository("alice/webhooks")).clone_url == f"{fake.url}/alice/webhooks.git"


async def test_repository_reads_the_forges_answer(api: ForgejoForge, monkeypatch: pytest.MonkeyPatch) -> None:
    """An answer shaped like Forgejo's `api.Repository` (owner as Gitea sends it to a Gogs
    client: `username` without `login`); canonical names come from the answer."""
    answer: dict[str, Any] = {
        "id": 7,
        "owner": {"id": 2, "username": "Forgejo", "full_name": "", "email": "forgejo@noreply.org"},
        "name": "WebHooks",
        "full_name": "Forgejo/WebHooks",
        "private": False,
        "fork": False,
        "clone_url": "https://codeberg.example/Forgejo/WebHooks.git",
        "ssh_url": "git@codeberg.example:Forgejo/WebHooks.git",
        "html_url": "https://codeberg.example/Forgejo/WebHooks",
        "default_branch": "main",
    }

    async def request(method: str, path: str, **_: Any) -> Any:
        return json.dumps(answer).encode(), {}

    monkeypatch.setattr(api.api, "request", request)
    assert await api.repository("forgejo/webhooks") == Repo(
        owner="Forgejo", name="WebHooks", clone_url="https://codeberg.example/Forgejo/WebHooks.git"
    )
    answer["clone_url"] = 12
    with pytest.raises(ForgeApiError, match="clone_url") as odd:
        await api.repository("forgejo/webhooks")
    assert (odd.value.status, odd.value.retry_after_s) == (200, None)


async def test_an_unknown_repository_is_a_404_that_says_so(fake: FakeForge, api: ForgejoForge) -> None:
    with pytest.raises(ForgeApiError, match="does not exist or the token cannot see it") as missing:
        await api.repository("nobody/nothing")
    assert (missing.value.status, missing.value.retry_after_s) == (404, None)
    assert fake.calls[-1].path == "/api/v1/repos/nobody/nothing"
    for bad in ("nothing", "a/b/c", "/nothing", "nobody/"):
        with pytest.raises(ForgeApiError, match="not owner/name") as refused:
            await api.repository(bad)
        assert refused.value.retry_after_s is None
    assert len(fake.calls) == 1


async def test_repository_lookup_failing_on_the_server_can_be_retried(fake: FakeForge, api: ForgejoForge) -> None:
    fake.branches["forgejo/webhooks"] = {"main": SHA}
    fake.fail_next(status=500)
    with pytest.raises(ForgeApiError) as failed:
        await api.repository("forgejo/webhooks")
    assert (failed.value.status, failed.value.retry_after_s) == (500, DEFAULT_RETRY_S)
    assert (await api.repository("forgejo/webhooks")).full_name == "forgejo/webhooks"
