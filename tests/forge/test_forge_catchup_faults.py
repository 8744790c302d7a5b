"""Catch-up under the conditions it exists for, on the real broker with a noop daemon and
the fake forges: every forge finds a moved branch and a new pull/merge request within
one pass (and their late webhooks run nothing again), a fork's pull request follows the
`forks` rule, long listings are paged to the end, the pass keeps to its budgets and
survives the forge's 5xx and 429 while the receiver keeps answering webhooks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.forge.base import CommitStatus, Repo, StatusState
from orchestrator.forge.config import LoadedForgeConfig, load_forge_config
from orchestrator.host.journal import JobState
from tests.conftest import make_settings, wait_for
from tests.support.fakeforge import FakeForge, Pull
from tests.support.fakeforge import forgejo as fake_forgejo
from tests.support.fakeforge import github as fake_github
from tests.support.fakeforge import gitlab as fake_gitlab
from tests.support.forgebridge import JOBS, SECRET, Bridge, start_bridge, write_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "forge"
JOBS_FILE = ".orchestrator.yaml"
OLD, MOVED, PR_HEAD, MARK = "1" * 40, "2" * 40, "3" * 40, "4" * 40
Webhook = tuple[dict[str, str], bytes]


# --- each forge's webhooks, built from its fixtures --------------------------------------------
def github_push(repo: str, branch: str, sha: str) -> Webhook:
    payload = json.loads(fake_github.fixture("push.branch"))
    payload.update(after=sha, ref=f"refs/heads/{branch}")
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("push", body, SECRET), body


def forgejo_signed(name: str, payload: dict[str, Any]) -> Webhook:
    """A Forgejo fixture's headers with a delivery id of its own (the same id twice is a
    redelivery, which would run nothing whatever catch-up did) and the body's signature."""
    body = json.dumps(payload).encode()
    headers = json.loads((FIXTURES / "forgejo" / f"{name}.headers.json").read_bytes())
    delivery = str(uuid.uuid4())
    headers.update({key: delivery for key in headers if key.endswith("-Delivery")})
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {**headers, "X-Forgejo-Signature": signature, "X-Gitea-Signature": signature}, body


def forgejo_push(repo: str, branch: str, sha: str) -> Webhook:
    payload = json.loads((FIXTURES / "forgejo" / "push_branch.json").read_bytes())
    payload.update(after=sha, ref=f"refs/heads/{branch}")
    payload["head_commit"]["id"] = sha
    return forgejo_signed("push_branch", payload)


def forgejo_pull_opened(repo: str, pull: Pull) -> Webhook:
    payload = json.loads((FIXTURES / "forgejo" / "pull_request_opened.json").read_bytes())
    payload["number"] = payload["pull_request"]["number"] = pull.number
    payload["pull_request"]["head"].update(sha=pull.head_sha, ref=pull.head_branch, label=pull.head_branch)
    payload["pull_request"]["base"].update(ref=pull.base_branch, label=pull.base_branch)
    return forgejo_signed("pull_request_opened", payload)


def gitlab_signed(name: str, payload: dict[str, Any]) -> Webhook:
    headers = json.loads((FIXTURES / "gitlab" / f"{name}.headers.json").read_bytes())
    headers.update({key: str(uuid.uuid4()) for key in ("Idempotency-Key", "X-Gitlab-Event-UUID") if key in headers})
    return {**headers, "X-Gitlab-Token": SECRET}, json.dumps(payload).encode()


def gitlab_push(repo: str, branch: str, sha: str) -> Webhook:
    payload = json.loads((FIXTURES / "gitlab" / "push.json").read_bytes())
    payload.update(after=sha, checkout_sha=sha, ref=f"refs/heads/{branch}")
    return gitlab_signed("push", payload)


def gitlab_merge_request_opened(repo: str, pull: Pull, project_id: int) -> Webhook:
    """GitLab's documented example is about another project than its `project`: made
    consistent here (a merge request of `repo` from one of its own branches)."""
    payload = json.loads((FIXTURES / "gitlab" / "merge_request_open.json").read_bytes())
    push = json.loads((FIXTURES / "gitlab" / "push.json").read_bytes())
    payload["project"] = push["project"]
    attrs = payload["object_attributes"]
    attrs.update(
        iid=pull.number,
        source_branch=pull.head_branch,
        target_branch=pull.base_branch,
        source_project_id=project_id,
        target_project_id=project_id,
        action="open",
        state="opened",
    )
    attrs["last_commit"]["id"] = pull.head_sha
    attrs["source"]["git_http_url"] = attrs["target"]["git_http_url"] = push["project"]["git_http_url"]
    return gitlab_signed("merge_request_open", payload)


GITLAB_PROJECT = 15  # the project of GitLab's push fixture


def install_gitlab(fake: FakeForge) -> None:
    fake_gitlab.install(fake)
    fake.project_ids["mike/diaspora"] = GITLAB_PROJECT


@dataclass(frozen=True)
class ForgeKit:
    kind: str
    install: Callable[[FakeForge], object]
    repo: str  # the repository its fixtures are about
    branch: str  # the branch its push fixture pushes to
    push: Callable[[str, str, str], Webhook]
    pull_opened: Callable[[str, Pull], Webhook]
    states: list[str]  # queued, running, success as the forge names them


KITS = [
    ForgeKit(
        "forgejo",
        fake_forgejo.install,
        "forgejo/webhooks",
        "develop",
        forgejo_push,
        forgejo_pull_opened,
        ["pending", "pending", "success"],
    ),
    ForgeKit(
        "gitlab",
        install_gitlab,
        "mike/diaspora",
        "master",
        gitlab_push,
        lambda repo, pull: gitlab_merge_request_opened(repo, pull, GITLAB_PROJECT),
        ["pending", "running", "success"],
    ),
]


# --- helpers ---------------------------------------------------------------------------------------
async def heads_recorded(
    bridge: Bridge, repo: str, *, including: str | None = None, timeout_s: float = 30
) -> dict[str, str]:
    """The heads the journal holds for `repo` once a pass recorded them (and `including`
    among them): a pass runs in the bridge's own task."""

    async def recorded() -> bool:
        heads = await bridge.bridge.journal.heads(bridge.forge, repo)
        return bool(heads) and (including is None or including in heads)

    await wait_for(recorded, what=f"a catch-up pass to record the heads of {repo}", timeout_s=timeout_s)
    return await bridge.bridge.journal.heads(bridge.forge, repo)


def status_posts(fake: FakeForge, sha: str) -> int:
    """Status calls the forge got for a commit (accepted or not)."""
    return sum(1 for call in fake.calls if call.method == "POST" and "/statuses/" in call.path and sha in call.path)


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The fields of each `event` logged so far."""
    return [dict(getattr(r, "fields", {})) for r in caplog.records if r.getMessage() == event]


def with_top_level(config: Path, **settings: Any) -> Path:
    """`write_config`'s file with top-level settings added (catch-up's budgets)."""
    config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()) + config.read_text())
    return config


def loaded(config: Path, fake: FakeForge) -> LoadedForgeConfig:
    return load_forge_config(
        config, environ={**os.environ, "TEST_FORGE_TOKEN": fake.token, "TEST_FORGE_SECRET": SECRET}
    )


def jobs_at(fake: FakeForge, repo: str, *shas: str) -> None:
    for sha in shas:
        fake.files[(repo, sha, JOBS_FILE)] = JOBS.encode()


async def accepted(bridge: Bridge, webhook: Webhook) -> None:
    """Deliver a webhook and require it taken as new work (not a redelivery: that would
    run nothing whatever catch-up did)."""
    status, text = await bridge.deliver(*webhook)
    assert status == 202 and json.loads(text)["outcome"] == "accepted", (status, text)


# --- 1. Forgejo and GitLab ------------------------------------------------------------------------
@pytest.mark.parametrize("kit", KITS, ids=[k.kind for k in KITS])
async def test_a_push_and_a_pull_request_made_while_the_bridge_was_down_run_once_on_forgejo_and_gitlab(
    kit, tmp_path, prefix, cleanup_topology, daemon_factory, broker
):
    fake = FakeForge()
    kit.install(fake)
    await fake.start()
    repo, other = kit.repo, "side"
    fake.branches[repo] = {kit.branch: OLD, other: OLD}
    config = write_config(tmp_path, forge=kit.kind, kind=kit.kind, api_url=fake.url, repo=repo)
    first = await start_bridge(prefix, tmp_path, fake, config, forge=kit.kind)
    try:
        await heads_recorded(first, repo)
        assert first.bridge.dispatcher.counts["jobs_published"] == 0, "a repository's first pass runs nothing"
    finally:
        await first.bridge.stop()
    # While the bridge is down: a branch moves and a pull/merge request opens, no webhook.
    pull = Pull(number=3, head_sha=PR_HEAD, base_branch=kit.branch, head_branch=other, head_repo=repo)
    fake.branches[repo][kit.branch] = MOVED
    fake.pulls[repo] = [pull]
    jobs_at(fake, repo, MOVED, PR_HEAD, MARK)
    await daemon_factory()
    await broker.open()
    second = await start_bridge(prefix, tmp_path, fake, config, forge=kit.kind)
    try:
        assert await fake.wait_for_statuses(MOVED, "orchestrator/test", 3) == kit.states
        assert await fake.wait_for_statuses(PR_HEAD, "orchestrator/test", 3) == kit.states
        for sha in (MOVED, PR_HEAD):
            assert next(s.description for s in fake.statuses if s.sha == sha) == "queued (caught up)"
        results = await broker.collect(2)
        assert sorted(r.commit_sha for r in results.values()) == [MOVED, PR_HEAD]
        assert second.bridge.catchup.caught_up[(kit.kind, repo)] == 2
        posts = {sha: status_posts(fake, sha) for sha in (MOVED, PR_HEAD)}
        # The lost webhooks arrive after all: taken (202), and nothing runs again.
        await accepted(second, kit.push(repo, kit.branch, MOVED))
        await accepted(second, kit.pull_opened(repo, pull))
        await second.bridge.dispatcher.settled()
        # A marker pushed after them: once its job is done, a job of theirs would be too.
        await accepted(second, kit.push(repo, other, MARK))
        assert (await broker.next_result()).commit_sha == MARK
        await fake.wait_for_statuses(MARK, "orchestrator/test", 3)
        assert broker.results.empty() and not broker.conflicts, "the late webhooks ran nothing"
        assert second.bridge.dispatcher.counts["jobs_published"] == 3
        assert {sha: status_posts(fake, sha) for sha in (MOVED, PR_HEAD)} == posts, "and set no status again"
        assert status_posts(fake, OLD) == 0
    finally:
        await second.bridge.stop()
        await fake.close()


# --- 2. forks ----------------------------------------------------------------------------------------
REPO = "octo-org/widgets"
FORK = "contrib-dev/widgets"
FORK_HEAD = "5" * 40


async def github_bridge(tmp_path: Path, prefix: str, fake: FakeForge, **repo_options: Any) -> Bridge:
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO, **repo_options)
    return await start_bridge(prefix, tmp_path, fake, config, forge="github")


async def first_pass(tmp_path: Path, prefix: str, fake: FakeForge, **repo_options: Any) -> None:
    """A bridge's first pass (it records the heads and runs nothing), then the bridge stops."""
    bridge = await github_bridge(tmp_path, prefix, fake, **repo_options)
    try:
        await heads_recorded(bridge, REPO)
    finally:
        await bridge.bridge.stop()


@pytest.mark.parametrize("forks", [False, True], ids=["forks-false", "forks-true"])
async def test_a_fork_pull_request_found_by_a_pass_follows_the_forks_rule_and_never_gets_secrets(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker, monkeypatch, caplog, forks
):
    monkeypatch.setenv("WIDGETS_DEPLOY_KEY", "s3cr3t-deploy-key")
    options = {"forks": forks, "secrets": {"DEPLOY_KEY": {"env": "WIDGETS_DEPLOY_KEY"}}}
    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {"main": OLD}
    await first_pass(tmp_path, prefix, fake, **options)
    fake.pulls[REPO] = [
        Pull(number=5, head_sha=PR_HEAD, base_branch="main", head_branch="feature", head_repo=REPO),
        Pull(number=12, head_sha=FORK_HEAD, base_branch="main", head_branch="main", head_repo=FORK),
    ]
    jobs_at(fake, REPO, PR_HEAD, FORK_HEAD)
    daemon = await daemon_factory()
    await broker.open()
    bridge = await github_bridge(tmp_path, prefix, fake, **options)
    try:
        await heads_recorded(bridge, REPO, including="pull/12")  # the pass is over
        await bridge.bridge.dispatcher.settled()
        ran = [PR_HEAD, FORK_HEAD] if forks else [PR_HEAD]
        results = await broker.collect(len(ran))
        assert sorted(r.commit_sha for r in results.values()) == sorted(ran)
        assert bridge.bridge.dispatcher.counts["jobs_published"] == len(ran)
        for sha in ran:
            assert await fake.wait_for_statuses(sha, "orchestrator/test", 3) == ["pending", "pending", "success"]
        # What the host was asked to run: each job's request, from the daemon's journal.
        requests = {r.request.commit_sha: r.request for r in await daemon.journal.in_states({JobState.PUBLISHED})}
        assert requests[PR_HEAD].env["DEPLOY_KEY"] == "s3cr3t-deploy-key", "a same-repository PR gets the secrets"
        if forks:
            assert "DEPLOY_KEY" not in requests[FORK_HEAD].env, "a fork's job never gets secrets"
            assert requests[FORK_HEAD].env["GREETING"] == "hello", "and keeps its own env"
            assert requests[FORK_HEAD].repo_url == f"https://github.com/{FORK}.git", "its commits are the fork's"
        else:
            assert FORK_HEAD not in requests, "a fork's PR does not run with forks: false"
            assert fake.statuses_for(FORK_HEAD) == [], "and shows no status"
            assert not [c for c in fake.calls if c.query.get("ref") == FORK_HEAD], "its jobs file is not even read"
            assert await bridge.bridge.journal.heads("github", REPO) == {
                "branch/main": OLD,
                "pull/5": PR_HEAD,
                "pull/12": FORK_HEAD,
            }
        assert bridge.bridge.catchup.caught_up[("github", REPO)] == 2, "both were handed on; the rule is the planner's"
        assert "s3cr3t-deploy-key" not in caplog.text, "secrets are never logged"
    finally:
        await bridge.bridge.stop()
        await fake.close()


# --- 3. long listings and the request budget ---------------------------------------------------------
BRANCHES = [f"b{n:03d}" for n in range(250)]  # 3 pages of 100: the last one on page 3


def branch_listings(fake: FakeForge, since: int = 0) -> list[dict[str, str]]:
    """The queries of the branch listings the fake answered since call number `since`."""
    return [call.query for call in fake.calls[since:] if call.path == f"/repos/{REPO}/branches"]


async def test_a_head_moved_on_the_last_of_three_pages_of_branches_is_found(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker
):
    from orchestrator.forge.service import catch_up_once

    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {name: OLD for name in BRANCHES}
    config = loaded(write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO), fake)
    settings = make_settings(prefix, tmp_path / "unused", tmp_path / "unused.yaml")
    try:
        [first] = await catch_up_once(settings, config, repo=REPO, dry_run=False)
        assert first.first_pass and first.heads == 250
        fake.branches[REPO][BRANCHES[-1]] = MOVED
        jobs_at(fake, REPO, MOVED)
        await daemon_factory()
        await broker.open()
        since = len(fake.calls)
        [report] = await catch_up_once(settings, config, repo=REPO, dry_run=False)
        assert report.error is None and report.heads == 250
        assert report.ran == [f"branch/{BRANCHES[-1]}@{MOVED}"]
        assert branch_listings(fake, since) == [
            {"per_page": "100"},
            {"per_page": "100", "page": "2"},
            {"per_page": "100", "page": "3"},
        ]
        assert (await broker.next_result()).commit_sha == MOVED
    finally:
        await fake.close()


async def test_a_pass_over_its_request_budget_stops_says_so_and_webhooks_are_still_answered(
    tmp_path, prefix, cleanup_topology, daemon_factory, caplog
):
    caplog.set_level(logging.INFO, logger="orchestrator.forge")
    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {name: OLD for name in BRANCHES}
    config = with_top_level(
        write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO), catchup_max_requests=2
    )
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    try:
        await wait_for(lambda: logged(caplog, "catchup.failed"), what="the pass to stop at its budget")
        [failed] = logged(caplog, "catchup.failed")
        assert failed["repo"] == REPO and "budget is spent" in failed["error"], failed
        assert f"/repos/{REPO}/branches" in failed["error"], "the log names the call it did not make"
        # Two calls: the repository, then the first page of branches; nothing after that.
        assert [c.path for c in fake.calls] == [f"/repos/{REPO}", f"/repos/{REPO}/branches"]
        assert not logged(caplog, "catchup.pass")
        assert await bridge.bridge.journal.heads("github", REPO) == {}, "a partial listing records nothing"
        # The receiver's own API client has no budget: a webhook still runs its jobs.
        await daemon_factory()
        jobs_at(fake, REPO, MARK)
        await accepted(bridge, github_push(REPO, "main", MARK))
        assert await fake.wait_for_statuses(MARK, "orchestrator/test", 3) == ["pending", "pending", "success"]
    finally:
        await bridge.bridge.stop()
        await fake.close()


# --- 4. the forge failing during a pass ----------------------------------------------------------------
async def test_5xx_and_429_during_a_pass_are_retried_nothing_is_lost_and_webhooks_are_answered_meanwhile(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker, caplog
):
    caplog.set_level(logging.INFO, logger="orchestrator.forge")
    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {name: OLD for name in BRANCHES}
    await first_pass(tmp_path, prefix, fake)
    fake.branches[REPO][BRANCHES[-1]] = MOVED  # on the last page
    fake.pulls[REPO] = [Pull(number=5, head_sha=PR_HEAD, base_branch="main", head_branch="feature", head_repo=REPO)]
    jobs_at(fake, REPO, MOVED, PR_HEAD, MARK)
    branches, pulls = f"/repos/{REPO}/branches", f"/repos/{REPO}/pulls"
    # The listing fails on page 2, then (tried again from the start) on page 3; the pull
    # requests are rate limited once. Each answer says when to try again.
    fake.fail_next(status=503, retry_after="1", path_prefix=branches, query={"page": "2"})
    fake.fail_next(status=500, retry_after="1", path_prefix=branches, query={"page": "3"})
    fake.fail_next(
        status=429,
        retry_after="1",
        path_prefix=pulls,
        headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "5000"},
    )
    await daemon_factory()
    await broker.open()
    since = len(fake.calls)
    bridge = await github_bridge(tmp_path, prefix, fake)
    try:
        await wait_for(lambda: len(fake.failures) == 2, what="the pass to meet the first failure")
        await accepted(bridge, github_push(REPO, "main", MARK))
        assert fake.failures, "the webhook was answered while the pass was still failing"
        results = await broker.collect(3, timeout_s=60)
        assert sorted(r.commit_sha for r in results.values()) == sorted([MOVED, PR_HEAD, MARK])
        for sha in (MOVED, PR_HEAD, MARK):
            assert await fake.wait_for_statuses(sha, "orchestrator/test", 3) == ["pending", "pending", "success"]
        await wait_for(lambda: len(logged(caplog, "catchup.pass")) == 2, what="the second bridge's pass to end")
        done = logged(caplog, "catchup.pass")[-1]
        assert (done["ran"], done["heads"]) == (2, 251)
        assert [e["retry_in_s"] for e in logged(caplog, "catchup.retry")] == [1.0, 1.0, 1.0], "as the forge asked"
        pages = [c.query.get("page", "1") for c in fake.calls[since:] if c.path == branches]
        assert pages == ["1", "2", "1", "2", "3", "1", "2", "3"], "a failed listing is read again from its start"
        assert len([c for c in fake.calls[since:] if c.path == pulls]) == 2
        assert bridge.bridge.dispatcher.counts["jobs_published"] == 3 and not broker.conflicts
    finally:
        await bridge.bridge.stop()
        await fake.close()


# --- 5. the commit budget ----------------------------------------------------------------------------------
async def test_a_pass_runs_at_most_catchup_max_commits_and_the_next_pass_runs_the_rest(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker, caplog
):
    from orchestrator.forge.service import catch_up_once

    caplog.set_level(logging.INFO, logger="orchestrator.forge")
    fake = await fake_github.install(FakeForge()).start()
    names = [f"topic-{n}" for n in range(5)]
    fake.branches[REPO] = {"main": OLD, **{name: OLD for name in names}}
    config = with_top_level(
        write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO), catchup_max_commits=2
    )
    await first_pass_with(config, tmp_path, prefix, fake)
    moved = {name: hashlib.sha1(name.encode()).hexdigest() for name in names}
    fake.branches[REPO].update(moved)
    jobs_at(fake, REPO, *moved.values())
    await daemon_factory()
    await broker.open()
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    try:
        first = await broker.collect(2)
        await wait_for(lambda: len(logged(caplog, "catchup.pass")) == 2, what="the pass at start to end")
        assert logged(caplog, "catchup.pass")[-1]["ran"] == 2
        [skipped] = logged(caplog, "catchup.skipped")
        assert (skipped["commits"], skipped["limit"], skipped["repo"]) == (3, 2, REPO)
        await bridge.bridge.dispatcher.settled()
        assert bridge.bridge.dispatcher.counts["jobs_published"] == 2
        # The next passes (here `forge catch-up` beside the bridge) run the rest, two at a time.
        reports = [
            await catch_up_once(bridge.bridge.settings, bridge.bridge.config, repo=REPO, dry_run=False)
            for _ in range(3)
        ]
        assert [(len(r.ran), r.skipped) for [r] in reports] == [(2, 1), (1, 0), (0, 0)], [r.line() for [r] in reports]
        rest = await broker.collect(3)
        ran = sorted(r.commit_sha for r in [*first.values(), *rest.values()])
        assert ran == sorted(moved.values()), "each moved head ran, once"
        assert not broker.conflicts
    finally:
        await bridge.bridge.stop()
        await fake.close()


async def first_pass_with(config: Path, tmp_path: Path, prefix: str, fake: FakeForge) -> None:
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    try:
        await heads_recorded(bridge, REPO)
    finally:
        await bridge.bridge.stop()


# --- a catch-up beside the running bridge -----------------------------------------------------------------
async def test_a_catch_up_beside_the_running_bridge_never_leaves_an_older_status_after_the_final_one(
    tmp_path, prefix, cleanup_topology, daemon_factory
):
    """`forge catch-up` (and `forge rerun`) share the journal with the running bridge and
    send statuses from it too. Here the command's "queued" is slow to reach the forge
    (held by the fake) while the bridge sends "running" and "success" for the same
    context: the forge must still end on "success".

    Two senders could take the same unsent step from `BridgeJournal.statuses_to_send`,
    the slower one sending an older state after a newer one (GitHub and Forgejo show the
    last status sent; GitLab starts a new status after a final one). A sender now claims
    the context first (`claim_status`). The fake holds every matching call, the bridge's
    copy of "queued" too, so this test shows the outcome; the test below, on two
    reporters alone, shows the race itself."""
    from orchestrator.forge.service import catch_up_once

    fake = await fake_github.install(FakeForge()).start()
    fake.branches[REPO] = {"main": OLD}
    bridge = await github_bridge(tmp_path, prefix, fake)
    try:
        await heads_recorded(bridge, REPO)
        fake.branches[REPO]["main"] = MOVED
        jobs_at(fake, REPO, MOVED)
        await daemon_factory()
        slow = fake.pause(path_prefix=f"/repos/{REPO}/statuses/{MOVED}", body_contains=b"queued (caught up)")
        command = asyncio.create_task(
            catch_up_once(bridge.bridge.settings, bridge.bridge.config, repo=REPO, dry_run=False)
        )
        await asyncio.wait_for(slow.arrived.wait(), 30)
        journal = bridge.bridge.journal

        async def result_journaled() -> bool:
            return await journal.last_status("github", REPO, MOVED, "orchestrator/test") == StatusState.SUCCESS

        await wait_for(result_journaled, what="the job's result in the bridge's journal")
        try:  # today the bridge sends it at once; a bridge that waits for the command's send does not
            await wait_for(lambda: "success" in fake.statuses_for(MOVED), what="the bridge's send", timeout_s=3)
        except AssertionError:
            pass
        slow.release()
        [report] = await asyncio.wait_for(command, 30)
        assert report.ran == [f"branch/main@{MOVED}"]
        await wait_for(lambda: "success" in fake.statuses_for(MOVED), what="the result on the commit")
        shown = [(s.state, s.description) for s in fake.statuses if s.sha == MOVED]
        assert shown[-1][0] == "success", f"the commit ends on {shown[-1]}; all sent: {shown}"
    finally:
        await bridge.bridge.stop()
        await fake.close()


class HeldForge:
    """A forge for two reporters: `set_status` records what arrives; with `hold` set,
    a call waits (a slow network) until the hold is released."""

    def __init__(self, shown: list[str], hold: asyncio.Event | None = None) -> None:
        self.shown, self.hold = shown, hold
        self.arrived = asyncio.Event()

    async def set_status(self, repo: Repo, commit_sha: str, status: CommitStatus) -> None:
        self.arrived.set()
        if self.hold is not None:
            await self.hold.wait()
        self.shown.append(status.description)


async def test_two_senders_of_one_journal_never_send_a_step_twice_or_out_of_order(tmp_path):
    """The race itself, without a broker: a second process's reporter (`forge catch-up`)
    is slow to send "queued" while the service's reporter has "running" and the result to
    send for the same context. The service waits for the context, then sends the rest."""
    from orchestrator.core.topology import Topology
    from orchestrator.forge.journal import BridgeJournal
    from orchestrator.forge.reporter import StatusReporter

    path = tmp_path / "forge.db"
    service_journal, command_journal = BridgeJournal(path), BridgeJournal(path)
    shown: list[str] = []
    hold = asyncio.Event()
    slow = HeldForge(shown, hold)

    def reporter(journal: BridgeJournal, forge: HeldForge) -> StatusReporter:
        return StatusReporter(
            journal=journal,
            forges={"github": forge},  # type: ignore[dict-item]
            topology=Topology("unused"),
            delivery_limit=5,
            quorum_size=3,
        )

    service, command = reporter(service_journal, HeldForge(shown)), reporter(command_journal, slow)
    repo = Repo("octo-org", "widgets", f"https://github.com/{REPO}.git")
    context = "orchestrator/test"
    try:
        await command.propose("github", repo, MOVED, CommitStatus(StatusState.PENDING, context, "queued (caught up)"))
        sending = asyncio.create_task(command.send_due())
        await asyncio.wait_for(slow.arrived.wait(), 10)
        await service.propose("github", repo, MOVED, CommitStatus(StatusState.RUNNING, context, "running on host0"))
        await service.propose("github", repo, MOVED, CommitStatus(StatusState.SUCCESS, context, "passed"))
        await service.send_due()
        assert shown == [], "the service sent while the command held the context"
        retry_at = await service_journal.next_status_try()
        assert retry_at is not None and retry_at - time.time() <= 1, "the service looks again soon"
        hold.set()
        await asyncio.wait_for(sending, 10)
        for _ in range(3):
            await service.send_due()
        assert shown == ["queued (caught up)", "running on host0", "passed"]
        assert await service_journal.next_status_try() is None, "nothing left to send"
    finally:
        await service_journal.close()
        await command_journal.close()


async def test_a_claim_left_by_a_sender_that_died_is_taken_at_once(tmp_path):
    """A sender SIGKILLed between its claim and its send leaves the claim behind: the
    next sender takes the context at once, not a lease (two minutes) later."""
    import sys

    from orchestrator.forge.journal import BridgeJournal
    from orchestrator.forge.reporter import SEND_LEASE_S

    path = tmp_path / "forge.db"
    journal = BridgeJournal(path)
    repo = Repo("octo-org", "widgets", f"https://github.com/{REPO}.git")
    try:
        await journal.propose_status(
            "github", repo, MOVED, CommitStatus(StatusState.PENDING, "orchestrator/test", "queued")
        )
        [listed] = await journal.statuses_to_send(time.time())
        claims_and_dies = (
            "import asyncio, os, sys, time\n"
            "from orchestrator.forge.journal import BridgeJournal\n"
            "async def main():\n"
            f"    journal = BridgeJournal(__import__('pathlib').Path({str(path)!r}))\n"
            f"    [listed] = await journal.statuses_to_send(time.time())\n"
            f"    assert await journal.claim_status(listed, now=time.time(), lease_s={SEND_LEASE_S})\n"
            "    await journal.close()\n"
            "    os._exit(0)\n"
            "asyncio.run(main())\n"
        )
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", claims_and_dies, cwd=Path(__file__).resolve().parents[2]
        )
        assert await child.wait() == 0
        claimed = await journal.claim_status(listed, now=time.time(), lease_s=SEND_LEASE_S)
        assert claimed is not None and claimed.status.description == "queued"
        assert await journal.claim_status(listed, now=time.time(), lease_s=SEND_LEASE_S) is None, (
            "held by this process now"
        )
    finally:
        await journal.close()
