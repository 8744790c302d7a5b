"""The forge bridge on the real broker with a noop daemon: a webhook runs the jobs of
the commit's jobs file and its statuses reach the commit; bad deliveries are refused;
nothing is lost while the broker is away and nothing runs twice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests.fakeforge import FakeForge
from tests.fakeforge import github as fake_github
from tests.forgebridge import JOBS, SECRET, Bridge, start_bridge, write_config

REPO = "octo-org/widgets"


@pytest.fixture
async def github(tmp_path, prefix, cleanup_topology) -> AsyncIterator[Bridge]:
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    yield bridge
    await bridge.bridge.stop()
    await fake.close()


def push(name: str = "push.branch") -> tuple[dict[str, str], bytes, str]:
    headers, body = fake_github.delivery(name, SECRET)
    return headers, body, json.loads(body)["after"]


async def test_a_push_runs_its_jobs_and_the_commit_shows_pending_running_success(github, daemon_factory):
    await daemon_factory(public_url="http://hv01.example:9465")
    headers, body, sha = push()
    github.fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
    assert (await github.deliver(headers, body))[0] == 202
    states = await github.fake.wait_for_statuses(sha, "orchestrator/test", 3)
    assert states == ["pending", "pending", "success"]
    shown = [s for s in github.fake.statuses if s.sha == sha]
    assert [s.description for s in shown][:2] == ["queued", "running on host0"]
    assert shown[-1].target_url.startswith("http://hv01.example:9465/jobs/") and shown[-1].target_url.endswith("/log")


def signed(event: str, payload: dict, *, delivery_id: str | None = None, secret: str = SECRET) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers(event, body, secret, delivery=delivery_id), body


def push_to(sha: str, *, branch: str = "main", delivery_id: str | None = None) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("push.branch"))
    payload.update(after=sha, ref=f"refs/heads/{branch}")
    return signed("push", payload, delivery_id=delivery_id)


async def test_bad_deliveries_are_refused_and_publish_nothing(github):
    headers, body, sha = push()
    github.fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
    wrong = fake_github.webhook_headers("push", body, "not-the-secret")
    assert (await github.deliver(wrong, body))[0] == 401
    unsigned = {k: v for k, v in headers.items() if not k.startswith("X-Hub-Signature")}
    assert (await github.deliver(unsigned, body))[0] == 401
    other = json.loads(body)
    other["repository"]["full_name"] = "someone/else"
    assert (await github.deliver(*signed("push", other)))[0] == 403
    status, text = await github.deliver({"X-GitHub-Event": "push", "Content-Type": "application/json"}, b"{not json")
    assert status == 400 and "JSON" in text
    for name in ("issue_comment.created", "pull_request.closed", "pull_request.labeled", "push.branch_deleted"):
        assert (await github.deliver(*fake_github.delivery(name, SECRET)))[0] == 204, name
    assert (await github.deliver(*fake_github.delivery("ping", SECRET)))[0] == 200
    assert github.bridge.dispatcher.counts["jobs_published"] == 0
    assert not [c for c in github.fake.calls if "/contents/" in c.path], "no delivery was acted on"


async def test_a_redelivered_webhook_publishes_nothing_new(github, daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    headers, body, sha = push()
    github.fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
    assert (await github.deliver(headers, body))[0] == 202
    first = await broker.next_result()
    status, text = await github.deliver(headers, body)  # the same X-GitHub-Delivery
    assert status == 202 and "redelivery" in text
    again = push_to(sha, delivery_id="another-delivery-of-the-same-push")  # same commit and ref
    assert (await github.deliver(*again))[0] == 202
    await github.fake.wait_for_statuses(sha, "orchestrator/test", 3)
    await github.bridge.dispatcher.work_once()
    assert github.bridge.dispatcher.counts["jobs_published"] == 1
    assert broker.results.empty() and str(first.request_id)


async def test_a_jobs_file_that_does_not_validate_is_one_error_status_naming_its_line(github):
    headers, body, sha = push()
    github.fake.files[(REPO, sha, ".orchestrator.yaml")] = b"jobs:\n  test:\n    script: make\n    runs_onn: alpha\n"
    assert (await github.deliver(headers, body))[0] == 202
    assert await github.fake.wait_for_statuses(sha, "orchestrator", 1) == ["error"]
    status = next(s for s in github.fake.statuses if s.context == "orchestrator")
    assert status.description.startswith(".orchestrator.yaml:4: jobs.test.runs_onn: unknown key")
    assert github.bridge.dispatcher.counts["jobs_published"] == 0


async def test_no_jobs_file_runs_nothing(github):
    headers, body, sha = push()
    assert (await github.deliver(headers, body))[0] == 202
    await github.bridge.dispatcher.work_once()
    assert github.bridge.dispatcher.counts["jobs_published"] == 0 and github.fake.statuses == []
    assert any(c.path.endswith("/contents/.orchestrator.yaml") and c.query.get("ref") == sha for c in github.fake.calls)


async def test_statuses_the_forge_refuses_for_now_are_retried(github, daemon_factory):
    await daemon_factory()
    headers, body, sha = push()
    github.fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
    github.fake.fail_next(1, status=500, path_prefix=f"/repos/{REPO}/statuses")
    github.fake.fail_next(1, status=429, retry_after="1", path_prefix=f"/repos/{REPO}/statuses")
    assert (await github.deliver(headers, body))[0] == 202
    states = await github.fake.wait_for_statuses(sha, "orchestrator/test", 1, timeout_s=30)
    assert states[-1] in ("pending", "success")
    assert (await github.fake.wait_for_statuses(sha, "orchestrator/test", 1, timeout_s=30))
    async def final() -> list[str]:
        while "success" not in github.fake.statuses_for(sha, "orchestrator/test"):
            github.fake.status_changed.clear()
            await github.fake.status_changed.wait()
        return github.fake.statuses_for(sha, "orchestrator/test")
    import asyncio
    assert (await asyncio.wait_for(final(), 30))[-1] == "success"
