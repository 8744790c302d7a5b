"""Catch-up on the real broker with a noop daemon and the fake forges: a push made, or a
pull request opened, while the bridge was down still gets its jobs and its statuses,
and the webhooks that arrive late run nothing again."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.support.fakeforge import FakeForge, Pull
from tests.support.fakeforge import github as fake_github
from tests.support.fakeforge import gitlab as fake_gitlab
from tests.support.forgebridge import JOBS, SECRET, Bridge, start_bridge, write_config

REPO = "octo-org/widgets"
OLD, MOVED, PR_HEAD = "1" * 40, "2" * 40, "3" * 40


async def github_bridge(tmp_path: Path, prefix: str, fake: FakeForge, **options) -> Bridge:
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO, **options)
    return await start_bridge(prefix, tmp_path, fake, config, forge="github")


async def first_pass_done(bridge: Bridge, repo: str = REPO, timeout_s: float = 30) -> None:
    """Until the pass at start has recorded the repository's heads (polled: the pass
    runs in the bridge's own task)."""
    async with asyncio.timeout(timeout_s):
        while not await bridge.bridge.journal.heads(bridge.forge, repo):
            await asyncio.sleep(0.02)


def push(sha: str, branch: str = "main") -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("push.branch"))
    payload.update(after=sha, ref=f"refs/heads/{branch}")
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("push", body, SECRET), body


def pull_opened(number: int, sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("pull_request.opened"))
    payload["number"] = number
    payload["pull_request"]["number"] = number
    payload["pull_request"]["head"]["sha"] = sha
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("pull_request", body, SECRET), body


async def test_a_push_and_a_pull_request_made_while_the_bridge_was_down_run_once(
    tmp_path, prefix, cleanup_topology, daemon_factory
):
    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {"main": OLD, "stale": OLD}
    first = await github_bridge(tmp_path, prefix, fake)
    await first_pass_done(first)
    assert first.bridge.dispatcher.counts["jobs_published"] == 0, "a repository's first pass runs nothing"
    await first.bridge.stop()
    # While the bridge is down: main moves, a pull request opens, a branch is deleted.
    fake.branches[REPO] = {"main": MOVED}
    fake.pulls[REPO] = [Pull(number=5, head_sha=PR_HEAD, base_branch="main", head_branch="feature", head_repo=REPO)]
    for sha in (MOVED, PR_HEAD):
        fake.files[(REPO, sha, ".orchestrator.yaml")] = JOBS.encode()
    await daemon_factory()
    second = await github_bridge(tmp_path, prefix, fake)
    try:
        assert await fake.wait_for_statuses(MOVED, "orchestrator/test", 3) == ["pending", "pending", "success"]
        assert await fake.wait_for_statuses(PR_HEAD, "orchestrator/test", 3) == ["pending", "pending", "success"]
        assert next(s.description for s in fake.statuses if s.sha == MOVED) == "queued (caught up)"
        assert second.bridge.catchup.caught_up[("github", REPO)] == 2
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{second.url}/metrics") as response:
                metrics = await response.text()
        assert f'orchestrator_forge_caught_up_total{{forge="github",repo="{REPO}"}} 2.0' in metrics
        assert "orchestrator_forge_last_catchup_timestamp_seconds{" in metrics
        calls = len(fake.statuses)
        # The webhooks that were lost arrive after all: nothing runs again.
        assert (await second.deliver(*push(MOVED)))[0] == 202
        assert (await second.deliver(*pull_opened(5, PR_HEAD)))[0] == 202
        await second.bridge.dispatcher.settled()
        assert second.bridge.dispatcher.counts["jobs_published"] == 2
        assert len(fake.statuses) == calls
        assert not [s for s in fake.statuses if s.sha == OLD], "the deleted branch ran nothing"
    finally:
        await second.bridge.stop()
        await fake.close()


async def test_a_gitlab_hook_the_forge_disabled_shows_in_readyz(tmp_path, prefix, cleanup_topology):
    fake = FakeForge()
    fake_gitlab.install(fake)
    await fake.start()
    project = "group/app"
    fake.branches[project] = {"main": OLD}
    fake.hooks[project] = [
        {
            "id": 7,
            "url": "https://ci.example.org/hooks/gitlab",
            "alert_status": "disabled",
            "push_events": True,
            "merge_requests_events": True,
        }
    ]
    config = write_config(tmp_path, forge="gitlab", kind="gitlab", api_url=fake.url, repo=project)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="gitlab")
    try:
        await first_pass_done(bridge, project)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{bridge.url}/readyz") as response:
                body = await response.json()
        assert response.status == 503
        assert any("webhook 7" in reason and "disabled" in reason for reason in body["reasons"]), body
    finally:
        await bridge.bridge.stop()
        await fake.close()


async def test_catch_up_dry_run_changes_nothing_and_a_real_one_runs_the_moved_head(
    tmp_path, prefix, cleanup_topology, daemon_factory
):
    from orchestrator.forge.service import catch_up_once

    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {"main": OLD}
    first = await github_bridge(tmp_path, prefix, fake)
    await first_pass_done(first)
    loaded, settings = first.bridge.config, first.bridge.settings
    await first.bridge.stop()
    fake.branches[REPO] = {"main": MOVED}
    fake.files[(REPO, MOVED, ".orchestrator.yaml")] = JOBS.encode()
    try:
        [dry] = await catch_up_once(settings, loaded, repo=REPO, dry_run=True)
        assert dry.ran == [f"branch/main@{MOVED}"] and fake.statuses == []
        await daemon_factory()
        [real] = await catch_up_once(settings, loaded, repo=REPO, dry_run=False)
        assert real.ran == [f"branch/main@{MOVED}"]
        assert (await fake.wait_for_statuses(MOVED, "orchestrator/test", 1))[0] == "pending"
        since = len(fake.calls)
        [again] = await catch_up_once(settings, loaded, repo=REPO, dry_run=False)
        assert again.ran == [], "a head that has run is not run again"
        assert [c.path for c in fake.calls[since:] if c.path == f"/repos/{REPO}"] == [], (
            "a pass keeps the repository it fetched: the next one does not ask for it again"
        )
    finally:
        await fake.close()


async def test_rerun_publishes_a_new_run_with_fresh_statuses(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker
):
    from orchestrator.forge.service import rerun_once

    fake = await fake_github.install(FakeForge()).start()
    bridge = await github_bridge(tmp_path, prefix, fake)
    try:
        await daemon_factory()
        await broker.open()
        fake.files[(REPO, MOVED, ".orchestrator.yaml")] = JOBS.encode()
        assert (await bridge.deliver(*push(MOVED)))[0] == 202
        first = await broker.next_result()
        await fake.wait_for_statuses(MOVED, "orchestrator/test", 3)
        lines = await rerun_once(bridge.bridge.settings, bridge.bridge.config, repo=REPO, commit_sha=MOVED, job="test")
        assert len(lines) == 1 and lines[0].startswith("test (branch/main): ")
        second = await broker.next_result()
        assert second.request_id != first.request_id and second.commit_sha == MOVED
        async with asyncio.timeout(30):  # the re-run's own steps, after the first run's success
            while fake.statuses_for(MOVED, "orchestrator/test").count("success") < 2:
                fake.status_changed.clear()
                await fake.status_changed.wait()
        states = fake.statuses_for(MOVED, "orchestrator/test")
        assert states[:3] == ["pending", "pending", "success"]
        assert states[3] == "pending" and states[-1] == "success", "the re-run started the context over"
        assert states == ["pending", "pending", "success"] * 2, "each step sent once (GitHub shows running as pending)"
    finally:
        await bridge.bridge.stop()
        await fake.close()


def test_the_alert_rules_name_metrics_the_services_export():
    import re

    import yaml

    root = Path(__file__).resolve().parents[2]
    rules = yaml.safe_load((root / "examples" / "prometheus" / "orchestrator-rules.yaml").read_text())
    sources = "".join(path.read_text() for path in (root / "orchestrator").rglob("*.py"))
    for group in rules["groups"]:
        for rule in group["rules"]:
            for metric in re.findall(r"orchestrator_[a-z_]+", rule["expr"]):
                base = metric.removesuffix("_total")
                assert f'"{base}"' in sources, f"{rule['alert']}: {metric} is not exported"
