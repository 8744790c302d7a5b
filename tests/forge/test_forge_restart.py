"""Nothing lost across a restart of the bridge: a delivery answered 202 is in the bridge's
journal, so a bridge stopped (or SIGKILLed) before it published the delivery's jobs
publishes them when it starts again on the same state_dir — once: exactly one result
for the commit, and its statuses reach the commit."""

from __future__ import annotations

import json

import pytest

from orchestrator.host.journal import JobState
from tests.conftest import AMQP_URL, wait_for
from tests.support.fakeforge import FakeForge
from tests.support.fakeforge import github as fake_github
from tests.support.forgebridge import (
    JOBS,
    SECRET,
    BridgeProcess,
    deliver_to,
    start_bridge,
    write_config,
)
from tests.web.test_httpapi import free_port

REPO = "octo-org/widgets"
SHA = "7" * 40
CONTENTS = f"/repos/{REPO}/contents/"


def push(sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("push.branch"))
    payload["after"] = sha
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("push", body, SECRET), body


def jobs_file_reads(fake: FakeForge) -> int:
    return sum(1 for call in fake.calls if call.path.startswith(CONTENTS))


async def exactly_one_run(fake: FakeForge, daemon, broker) -> None:
    """The commit's job ran once: one result, one job at the host, statuses ending in
    one success."""
    result = await broker.next_result(timeout_s=60)
    assert result.commit_sha == SHA and result.status.value == "succeeded"
    states = await fake.wait_for_state(SHA, "orchestrator/test", "success", timeout_s=60)
    assert states[0] == "pending" and states.count("success") == 1 and states[-1] == "success", states
    jobs = [record for record in await daemon.journal.in_states(set(JobState)) if record.request.commit_sha == SHA]
    assert [record.job_id for record in jobs] == [str(result.request_id)]
    assert broker.results.empty() and broker.redeliveries == 0 and not broker.conflicts


async def test_a_delivery_open_when_the_bridge_stops_runs_once_after_it_restarts(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker
):
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO)
    try:
        daemon = await daemon_factory()
        await broker.open()
        fake.files[(REPO, SHA, ".orchestrator.yaml")] = JOBS.encode()
        fake.fail_next(1000, status=500, path_prefix=CONTENTS)  # the jobs file cannot be read for now
        first = await start_bridge(prefix, tmp_path, fake, config, forge="github")
        assert (await first.deliver(*push(SHA)))[0] == 202
        await wait_for(lambda: jobs_file_reads(fake) >= 1, what="the bridge to try the jobs file")
        assert len(await first.bridge.journal.open_deliveries()) == 1
        await first.bridge.stop()
        assert first.bridge.dispatcher.counts["jobs_published"] == 0 and fake.statuses == []
        fake.failures.clear()
        second = await start_bridge(prefix, tmp_path, fake, config, forge="github")
        try:
            await exactly_one_run(fake, daemon, broker)
            assert next(s.description for s in fake.statuses if s.sha == SHA) == "queued", "resumed, not caught up"
            await second.bridge.dispatcher.settled()
            assert await second.bridge.journal.open_deliveries() == []
            assert second.bridge.dispatcher.counts["jobs_published"] == 1
        finally:
            await second.bridge.stop()
    finally:
        await fake.close()


@pytest.mark.parametrize("jobs_file_fails", [True, False], ids=["jobs file unreadable", "at once"])
async def test_a_bridge_killed_right_after_its_202_runs_the_push_once_after_it_restarts(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker, jobs_file_fails
):
    fake = await fake_github.install(FakeForge()).start()
    port = free_port()
    config = write_config(
        tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO, listen=f"127.0.0.1:{port}"
    )
    env = {"AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix, "TEST_FORGE_TOKEN": fake.token, "TEST_FORGE_SECRET": SECRET}
    try:
        daemon = await daemon_factory()
        await broker.open()
        fake.files[(REPO, SHA, ".orchestrator.yaml")] = JOBS.encode()
        if jobs_file_fails:
            fake.fail_next(1000, status=500, path_prefix=CONTENTS)
        first = await BridgeProcess(config, env).start()
        status, text = await deliver_to(f"http://127.0.0.1:{port}", "github", *push(SHA))
        await first.kill()
        assert status == 202, text
        fake.failures.clear()
        second = await BridgeProcess(config, env).start()
        await exactly_one_run(fake, daemon, broker)
        assert await second.stop(timeout_s=10) == 0
    finally:
        await fake.close()
