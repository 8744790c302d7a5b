"""GitLab: webhook deliveries (payloads from GitLab's documentation, one file per event
variant) into events, and the REST API v4 against a local fake of its documented
endpoints (`tests/fakeforge/gitlab.py`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.forge.base import (
    EventKind,
    ForgeEvent,
    Ignored,
    Ping,
    Repo,
    WebhookError,
)
from orchestrator.forge.gitlab import GitLabForge

FIXTURES = Path(__file__).parent / "fixtures" / "forge" / "gitlab"
SECRET = "s3cr3t-webhook-token"
SHA = "0123456789abcdef0123456789abcdef01234567"


def delivery(name: str) -> tuple[dict[str, str], bytes]:
    headers = json.loads((FIXTURES / f"{name}.headers.json").read_text())
    return headers, (FIXTURES / f"{name}.json").read_bytes()


def signed(name: str, token: str = SECRET) -> tuple[dict[str, str], bytes]:
    headers, body = delivery(name)
    return {**headers, "X-Gitlab-Token": token}, body


def payload(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def parse(document: dict[str, Any], event: str = "Push Hook") -> Any:
    return GitLabForge("https://gitlab.example.com", "t").parse({"X-Gitlab-Event": event}, json.dumps(document).encode())


forge = GitLabForge("https://gitlab.example.com", "token")

DIASPORA = Repo(owner="mike", name="diaspora", clone_url="http://example.com/mike/diaspora.git", project_id=15)
EXAMPLE = Repo(owner="jsmith", name="example", clone_url="http://example.com/jsmith/example.git", project_id=1)
GITLAB_TEST = Repo(owner="gitlabhq", name="gitlab-test", clone_url="http://example.com/gitlabhq/gitlab-test.git",
                   project_id=1)


def merge_request(sha: str = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7", **changes: Any) -> ForgeEvent:
    event = ForgeEvent(kind=EventKind.PULL_REQUEST, repo=GITLAB_TEST, commit_sha=sha, branch="master", pull_number=1,
                       head_branch="ms-viewport",
                       head_clone_url="http://example.com/awesome_space/awesome_project.git", sender="root")
    return dataclasses.replace(event, **changes)


# Each fixture and what the bridge makes of it (delivery ids are filled in from the headers).
EXPECTED: dict[str, ForgeEvent | Ping | Ignored] = {
    "push": ForgeEvent(kind=EventKind.PUSH, repo=DIASPORA, commit_sha="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
                       branch="master", sender="jsmith"),
    "tag_push": ForgeEvent(kind=EventKind.PUSH, repo=EXAMPLE, commit_sha="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7",
                           branch=None, tag="v1.0.0"),
    # An annotated tag: `after` is the tag object, `checkout_sha` the commit.
    "tag_push_annotated": ForgeEvent(kind=EventKind.PUSH, repo=EXAMPLE,
                                     commit_sha="82b3d5ae55f7080f1e6022629cdb57bfae7cccc7", branch=None,
                                     tag="v1.0.0-annotated"),
    "push_branch_deleted": Ignored("branch feature/old deleted"),
    "tag_push_deleted": Ignored("tag v1.0.0 deleted"),
    "push_test_sample": Ping(),
    "merge_request_open": merge_request(),
    "merge_request_reopen": merge_request(),
    "merge_request_update_new_commits": merge_request(sha="b6568db1bc1dcd7f8b4d5a946b0b91f9dacd7327"),
    "merge_request_fork_open": merge_request(head_branch="fix-typo", from_fork=True,
                                             head_clone_url="http://example.com/contributor/awesome_project.git"),
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
    assert (event.repo.owner, event.repo.name, event.repo.full_name) == ("acme/platform/tools", "diaspora",
                                                                        "acme/platform/tools/diaspora")


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


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe{}", "not JSON"),
    (b"[" * 100_000, "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
])
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


@pytest.mark.parametrize(("name", "event", "change", "field"), [
    ("push", "Push Hook", lambda d: d.pop("project"), "project"),
    ("push", "Push Hook", lambda d: d["project"].update(id="15"), "project.id"),
    ("push", "Push Hook", lambda d: d["project"].update(path_with_namespace="diaspora"), "project.path_with_namespace"),
    ("push", "Push Hook", lambda d: d.update(after="da15608"), "after"),
    ("push", "Push Hook", lambda d: d.update(ref=None), "ref"),
    ("merge_request_open", "Merge Request Hook", lambda d: d["object_attributes"].pop("state"),
     "object_attributes.state"),
    ("merge_request_open", "Merge Request Hook", lambda d: d["object_attributes"]["last_commit"].update(id=12),
     "object_attributes.last_commit.id"),
    ("merge_request_open", "Merge Request Hook", lambda d: d["object_attributes"].update(iid="1"),
     "object_attributes.iid"),
    ("merge_request_update_new_commits", "Merge Request Hook", lambda d: d["object_attributes"].update(oldrev=""),
     "object_attributes.oldrev"),
])
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
