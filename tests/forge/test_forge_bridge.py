"""The forge bridge on the real broker with a noop daemon: a webhook runs the jobs of
the commit's jobs file and its statuses reach the commit; bad deliveries are refused;
nothing is lost while the broker is away and nothing runs twice."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aio_pika
import aiohttp
import pytest

from orchestrator.core.messages import EventKind, JobEvent
from orchestrator.host.journal import JobState
from tests.conftest import wait_for
from tests.support.fakeforge import FakeForge
from tests.support.fakeforge import github as fake_github
from tests.support.forgebridge import JOBS, SECRET, Bridge, start_bridge, write_config

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


def signed(
    event: str, payload: dict, *, delivery_id: str | None = None, secret: str = SECRET
) -> tuple[dict[str, str], bytes]:
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
    await github.bridge.dispatcher.settled()
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
    await github.bridge.dispatcher.settled()
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
    assert await github.fake.wait_for_statuses(sha, "orchestrator/test", 1, timeout_s=30)

    async def final() -> list[str]:
        while "success" not in github.fake.statuses_for(sha, "orchestrator/test"):
            github.fake.status_changed.clear()
            await github.fake.status_changed.wait()
        return github.fake.statuses_for(sha, "orchestrator/test")

    import asyncio

    assert (await asyncio.wait_for(final(), 30))[-1] == "success"


async def bridge_with(tmp_path, prefix, **repo_options) -> Bridge:
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO, **repo_options)
    return await start_bridge(prefix, tmp_path, fake, config, forge="github")


async def stop(bridge: Bridge) -> None:
    await bridge.bridge.stop()
    await bridge.fake.close()


@pytest.mark.parametrize("forks", [False, True])
async def test_secrets_go_to_pushes_and_same_repo_prs_never_to_forks(
    tmp_path, prefix, cleanup_topology, daemon_factory, caplog, monkeypatch, forks
):
    monkeypatch.setenv("WIDGETS_DEPLOY_KEY", "s3cr3t-deploy-key")
    bridge = await bridge_with(tmp_path, prefix, forks=forks, secrets={"DEPLOY_KEY": {"env": "WIDGETS_DEPLOY_KEY"}})
    try:
        daemon = await daemon_factory()
        deliveries = {
            name: fake_github.delivery(name, SECRET)
            for name in ("push.branch", "pull_request.opened", "pull_request.opened.fork")
        }
        shas = {}
        for name, (headers, body) in deliveries.items():
            payload = json.loads(body)
            shas[name] = payload["after"] if "after" in payload else payload["pull_request"]["head"]["sha"]
            bridge.fake.files[(REPO, shas[name], ".orchestrator.yaml")] = JOBS.encode()
            assert (await bridge.deliver(headers, body))[0] == 202
        for name in ("push.branch", "pull_request.opened") + (("pull_request.opened.fork",) if forks else ()):
            await bridge.fake.wait_for_statuses(shas[name], "orchestrator/test", 3)
        await bridge.bridge.dispatcher.settled()
        # What the host was asked to run: the env of each job, from the daemon's journal.
        envs = {
            record.request.commit_sha: record.request.env
            for record in await daemon.journal.in_states({JobState.PUBLISHED})
        }
        assert envs[shas["push.branch"]]["DEPLOY_KEY"] == "s3cr3t-deploy-key"
        assert envs[shas["pull_request.opened"]]["DEPLOY_KEY"] == "s3cr3t-deploy-key"
        if forks:
            assert "DEPLOY_KEY" not in envs[shas["pull_request.opened.fork"]], "a fork's job never gets secrets"
        else:
            assert shas["pull_request.opened.fork"] not in envs, "a fork's job does not run with forks: false"
        assert "s3cr3t-deploy-key" not in caplog.text, "secrets are never logged"
    finally:
        await stop(bridge)


async def test_webhooks_taken_while_the_broker_is_away_are_published_once_it_is_back(
    tmp_path, prefix, cleanup_topology, amqp_proxy, daemon_factory, broker
):
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github", amqp_url=amqp_proxy.url)
    try:
        await daemon_factory()
        await broker.open()
        amqp_proxy.down()
        shas = [f"{n:040x}" for n in range(1, 4)]
        for sha in shas:
            fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
            assert (await bridge.deliver(*push_to(sha)))[0] == 202, "answered while the broker is away"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{bridge.url}/readyz") as response:
                ready = await response.json()
                assert response.status == 503 and "broker" in ready["reasons"][0] and ready["broker_node"] is None
        amqp_proxy.up()
        results = await broker.collect(3, timeout_s=60)
        assert sorted(r.commit_sha for r in results.values()) == shas
        for sha in shas:
            assert (await fake.wait_for_statuses(sha, "orchestrator/test", 1))[-1] in ("pending", "success")
        await bridge.bridge.dispatcher.settled()
        assert bridge.bridge.dispatcher.counts["jobs_published"] == 3
        assert broker.results.empty() and not broker.conflicts
    finally:
        await stop(bridge)


async def test_a_new_push_supersedes_the_running_jobs_of_the_previous_head(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker
):
    bridge = await bridge_with(tmp_path, prefix, cancel_superseded=True)
    try:
        daemon = await daemon_factory()
        await broker.open()
        old, new = "a" * 40, "b" * 40
        slow = JOBS.replace('NOOP_DURATION_S: "1"', 'NOOP_DURATION_S: "60"')
        bridge.fake.files[(REPO, old, ".orchestrator.yaml")] = slow.encode()
        bridge.fake.files[(REPO, new, ".orchestrator.yaml")] = JOBS.encode()
        assert (await bridge.deliver(*push_to(old)))[0] == 202
        await bridge.fake.wait_for_statuses(old, "orchestrator/test", 2)  # queued, running
        assert (await bridge.deliver(*push_to(new)))[0] == 202
        results = await broker.collect(2, timeout_s=60)
        by_sha = {r.commit_sha: r for r in results.values()}
        assert by_sha[old].status.value == "cancelled" and by_sha[new].status.value == "succeeded"
        await bridge.fake.wait_for_statuses(new, "orchestrator/test", 3)
        old_statuses = [s for s in bridge.fake.statuses if s.sha == old]
        assert old_statuses[-1].state == "error" and old_statuses[-1].description == f"superseded by {new[:12]}"
        assert not daemon.runner.running
    finally:
        await stop(bridge)


async def test_a_late_started_event_never_overwrites_a_result(github, daemon_factory, broker, amqp):
    await daemon_factory()
    headers, body, sha = push()
    github.fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
    assert (await github.deliver(headers, body))[0] == 202
    assert (await github.fake.wait_for_statuses(sha, "orchestrator/test", 3))[-1] == "success"
    run = (await github.bridge.journal.runs_for_ref("github", REPO, "branch/main"))[0]
    channel = await amqp.channel()
    events = await channel.get_exchange(broker.topology.events, ensure=False)
    late = JobEvent(kind=EventKind.STARTED, request_id=run.request_id, host="slow-host")
    await events.publish(aio_pika.Message(late.model_dump_json().encode()), routing_key="job.started.alpha")
    await channel.close()
    await wait_for(lambda: github.bridge.reporter is not None and not github.fake.failures, what="the late event")
    marker = push_to("c" * 40)  # a later delivery, to know the late event was handled before it
    github.fake.files[(REPO, "c" * 40, ".orchestrator.yaml")] = JOBS.encode()
    assert (await github.deliver(*marker))[0] == 202
    await github.fake.wait_for_statuses("c" * 40, "orchestrator/test", 3)
    assert github.fake.statuses_for(sha, "orchestrator/test") == ["pending", "pending", "success"]


def test_the_example_config_checks_with_its_secrets_set(monkeypatch, capsys):
    from pathlib import Path

    from orchestrator.cli import main

    example = Path(__file__).resolve().parents[2] / "examples" / "forge.yaml"
    for name in (
        "GITHUB_TOKEN",
        "GITHUB_WEBHOOK_SECRET",
        "FORGEJO_TOKEN",
        "FORGEJO_WEBHOOK_SECRET",
        "GITLAB_TOKEN",
        "GITLAB_WEBHOOK_TOKEN",
        "WIDGETS_DEPLOY_KEY",
    ):
        monkeypatch.setenv(name, f"value-of-{name}")
    assert main(["forge", "check", "--config", str(example)]) == 0
    out = capsys.readouterr().out
    assert "forge github: github at https://api.github.com, webhook URL /hooks/github" in out
    assert "value-of-" not in out
    monkeypatch.delenv("GITLAB_TOKEN")
    assert main(["forge", "check", "--config", str(example)]) == 2
    err = capsys.readouterr().err
    assert "forges.gitlab.token: environment variable GITLAB_TOKEN is empty or not set" in err


async def test_a_body_above_the_cap_is_refused_before_it_is_read(github):
    huge = b"{" + b" " * (25 * 1024 * 1024) + b"}"
    headers = fake_github.webhook_headers("push", huge, SECRET)
    status, _ = await github.deliver(headers, huge)
    assert status == 413
    assert github.bridge.dispatcher.counts["jobs_published"] == 0


async def test_without_a_jobs_file_the_fallback_runs_and_other_jobs_results_are_ignored(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker
):
    bridge = await bridge_with(tmp_path, prefix, fallback={"runs_on": "alpha", "script_path": "ci/run.sh"})
    try:
        daemon = await daemon_factory()
        await broker.open()
        headers, body, sha = push()
        assert (await bridge.deliver(headers, body))[0] == 202  # no .orchestrator.yaml at this commit
        assert (await bridge.fake.wait_for_statuses(sha, "orchestrator/ci", 3))[-1] == "success"
        record = next(iter(await daemon.journal.in_states({JobState.PUBLISHED})))
        assert record.request.script_path == "ci/run.sh" and record.request.workflow_job_id == "ci"
        calls = len(bridge.fake.calls)
        other = await broker.submit(runs_on="alpha")  # a job that did not come from a forge
        results = await broker.collect(2)
        assert other.job_id in results
        await bridge.bridge.reporter.send_due()
        assert len(bridge.fake.calls) == calls, "no status for a job the bridge did not publish"
    finally:
        await stop(bridge)


async def test_the_receiver_holds_a_bounded_number_of_connections_and_closes_idle_ones(
    tmp_path, prefix, cleanup_topology
):
    import asyncio

    fake = await fake_github.install(FakeForge()).start()
    config = write_config(
        tmp_path,
        forge="github",
        kind="github",
        api_url=fake.url,
        repo=REPO,
        top={"max_connections": 4, "header_timeout_s": 1},
    )
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    try:
        idle = [await asyncio.open_connection("127.0.0.1", bridge.bridge.port) for _ in range(6)]
        closed_at_once = 0
        for reader, _ in idle[4:]:  # beyond the cap: closed as soon as accepted
            closed_at_once += await asyncio.wait_for(reader.read(), 2) == b""
        assert closed_at_once == 2
        for reader, _ in idle[:4]:  # silent ones: closed after the header timeout
            assert await asyncio.wait_for(reader.read(), 5) == b""
        for _, writer in idle:
            writer.close()
        assert (await bridge.deliver(*push()[:2]))[0] in (202, 204), "still taking webhooks"
    finally:
        await stop(bridge)
