"""Commit statuses the forge refuses: a 5xx or a rate limit (429 with `Retry-After`) on
a job's final status is retried until it arrives, never sooner than the forge asked;
another 4xx is dropped at once (not retried) and counted on /metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import wait_for
from tests.support.fakeforge import Call, FakeForge
from tests.support.fakeforge import github as fake_github
from tests.support.forgebridge import SECRET, Bridge, start_bridge, write_config

REPO = "octo-org/widgets"
SHA = "8" * 40
CONTEXT = "orchestrator/test"
STATUSES = f"/repos/{REPO}/statuses/{SHA}"
# Two seconds of running: time to arm a failure between "running" and the result.
JOBS = """\
jobs:
  test:
    runs_on: alpha
    env: {NOOP_DURATION_S: "2"}
    script: make test
"""


@pytest.fixture
async def github(tmp_path, prefix, cleanup_topology) -> AsyncIterator[Bridge]:
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    yield bridge
    await bridge.bridge.stop()
    await fake.close()


def push(sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("push.branch"))
    payload["after"] = sha
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("push", body, SECRET), body


def posts_of(fake: FakeForge, state: str) -> list[Call]:
    """The status POSTs for SHA in `state` the fake received (refused ones included)."""
    return [c for c in fake.calls if c.method == "POST" and c.path == STATUSES and json.loads(c.body)["state"] == state]


async def running(github: Bridge) -> None:
    """Until the job's "running" status is on the commit (its result not yet)."""
    github.fake.files[(REPO, SHA, ".orchestrator.yaml")] = JOBS.encode()
    assert (await github.deliver(*push(SHA)))[0] == 202
    await github.fake.wait_for_statuses(SHA, CONTEXT, 2)
    assert [s.description for s in github.fake.statuses if s.sha == SHA] == ["queued", "running on host0"]


async def test_a_final_status_refused_with_500_then_429_arrives_after_retry_after(github, daemon_factory):
    await daemon_factory()
    await running(github)
    github.fake.fail_next(1, status=500, path_prefix=STATUSES)
    github.fake.fail_next(1, status=429, retry_after="1", path_prefix=STATUSES)
    states = await github.fake.wait_for_state(SHA, CONTEXT, "success", timeout_s=60)
    assert states == ["pending", "pending", "success"]
    first, rate_limited, taken = posts_of(github.fake, "success")  # exactly three
    assert taken.at - rate_limited.at >= 1.0, "retried sooner than Retry-After: 1"
    assert taken.at - first.at >= 1.0
    assert not github.bridge.reporter.dropped


async def test_a_retry_after_longer_than_the_backoff_is_waited_for(github, daemon_factory):
    # The reporter's own first backoff is 1 s: only a longer Retry-After shows it is read.
    await daemon_factory()
    await running(github)
    github.fake.fail_next(1, status=429, retry_after="3", path_prefix=STATUSES)
    await github.fake.wait_for_state(SHA, CONTEXT, "success", timeout_s=60)
    refused, taken = posts_of(github.fake, "success")
    assert taken.at - refused.at >= 3.0, f"retried {taken.at - refused.at:.2f} s after a Retry-After of 3 s"


async def test_a_status_refused_with_422_is_dropped_not_retried_and_counted(github, daemon_factory):
    await daemon_factory()
    await running(github)
    github.fake.fail_next(1, status=422, path_prefix=STATUSES)
    await wait_for(
        lambda: github.bridge.reporter.dropped[("github", "422")] == 1, what="the status dropped", timeout_s=30
    )

    async def nothing_to_send() -> bool:
        return await github.bridge.journal.next_status_try() is None

    await wait_for(nothing_to_send, what="no status left to send or retry")
    await github.bridge.reporter.send_due()  # the sender is idle: a status still due would go now
    assert len(posts_of(github.fake, "success")) == 1, "a 422 is not retried"
    assert github.fake.statuses_for(SHA, CONTEXT) == ["pending", "pending"]
    async with aiohttp.ClientSession() as http, http.get(f"{github.url}/metrics") as response:
        metrics = await response.text()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
    }
    assert samples[("orchestrator_forge_status_failures_total", (("code", "422"), ("forge", "github")))] == 1.0


async def test_a_step_waiting_behind_a_retried_one_does_not_make_the_sender_poll(tmp_path):
    """The sender sleeps until the next step is due. A context's later step waits for its
    oldest one: while that one backs off, the later one is not due (the sender used to
    wake every 50 ms until the retry)."""
    import time

    from orchestrator.forge.base import CommitStatus, Repo, StatusState
    from orchestrator.forge.journal import BridgeJournal

    journal = BridgeJournal(tmp_path / "forge.db")
    repo = Repo("octo-org", "widgets", f"https://github.com/{REPO}.git")
    try:
        await journal.propose_status("github", repo, SHA, CommitStatus(StatusState.PENDING, CONTEXT, "queued"))
        [queued] = await journal.statuses_to_send(time.time())
        retry_at = time.time() + 60
        await journal.status_retry(queued, at=retry_at, error="HTTP 503")
        await journal.propose_status(
            "github", repo, SHA, CommitStatus(StatusState.RUNNING, CONTEXT, "running on host0")
        )
        assert await journal.statuses_to_send(time.time()) == []
        assert await journal.next_status_try() == retry_at
    finally:
        await journal.close()
