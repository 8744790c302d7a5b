"""A repository's jobs file, from the forge to the host: which jobs each event runs (`on:`
events, branch and tag globs, pull requests by their target branch), every field of
each job request the bridge publishes, and jobs files that are wrong or hostile — one
`error` status naming the line, no job, and a bridge that goes on working."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from orchestrator.forge.base import EventKind, ForgeEvent, Repo
from orchestrator.forge.jobsfile import (
    JOBS_FILE_MAX_BYTES,
    JobsFileError,
    Trigger,
    parse_jobs_file,
)
from orchestrator.forge.planner import request_id_for
from orchestrator.host.journal import JobState
from tests.conftest import wait_for
from tests.support.fakeforge import FakeForge
from tests.support.fakeforge import github as fake_github
from tests.support.forgebridge import JOBS, SECRET, Bridge, start_bridge, write_config

FORGE_PAGE = Path(__file__).resolve().parents[2] / "docs" / "forge-bridge.md"
REPO = "octo-org/widgets"
CLONE_URL = "https://github.com/octo-org/widgets.git"
JOBS_FILE = ".orchestrator.yaml"

# The documented example job (`test`, docs/forge-bridge.md), and jobs that use the rest of the format. `on` is
# quoted here and unquoted in the documented example: both are read as the key `on`.
EXAMPLE = """\
jobs:
  test:                        # the job's name; commit status context "orchestrator/test"
    runs_on: alpha
    size: small
    timeout_s: 1800
    env: {GREETING: hello}
    script: |
      make test
    "on": {events: [push, pull_request], branches: [main, "release/*"]}
  build:                       # every push, to a branch or a tag
    runs_on: alpha
    cpus: 2
    memory_mb: 512
    script_path: ci/build.sh
    "on": {events: [push]}
  release:                     # release branches and version tags
    runs_on: alpha
    timeout_s: 600
    env: {CHANNEL: stable}
    script: ./release.sh
    "on": {events: [push], branches: ["release/*"], tags: ["v*"]}
  lint:                        # pull requests, on the fleet's default label
    script: ruff check .
    "on": {events: [pull_request]}
"""

# What each job asks a host for (the request's fields that come from the jobs file).
JOB_FIELDS = {
    "test": {
        "runs_on": "alpha",
        "size": "small",
        "cpus": None,
        "memory_mb": None,
        "timeout_s": 1800,
        "script": "make test\n",
        "script_path": None,
        "env": {"GREETING": "hello"},
    },
    "build": {
        "runs_on": "alpha",
        "size": None,
        "cpus": 2,
        "memory_mb": 512,
        "timeout_s": None,
        "script": None,
        "script_path": "ci/build.sh",
        "env": {},
    },
    "release": {
        "runs_on": "alpha",
        "size": None,
        "cpus": None,
        "memory_mb": None,
        "timeout_s": 600,
        "script": "./release.sh",
        "script_path": None,
        "env": {"CHANNEL": "stable"},
    },
    "lint": {
        "runs_on": None,
        "size": None,
        "cpus": None,
        "memory_mb": None,
        "timeout_s": None,
        "script": "ruff check .",
        "script_path": None,
        "env": {},
    },
}

# event -> (commit, ref key, the jobs it runs)
EVENTS = {
    "push to main": ("1" * 40, "branch/main", {"test", "build"}),
    "push to release/1.2": ("2" * 40, "branch/release/1.2", {"test", "build", "release"}),
    "push to feature/login": ("3" * 40, "branch/feature/login", {"build"}),
    "push of tag v1.4.0": ("4" * 40, "tag/v1.4.0", {"build", "release"}),
    "pull request #7 into main": ("5" * 40, "pull/7", {"test", "lint"}),
}

# Hostile jobs files: name -> (text, the line the error names, what it says).
_LAUGHS = "".join(f"  lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 10))
HOSTILE = {
    "billion laughs": (
        ("x:\n  lol0: &l0 lol\n" + _LAUGHS + "jobs:\n  test:\n    script: echo\n").encode(),
        7,
        "aliases expand to more than 100000 nodes",  # lol5: the first anchor over the budget
    ),
    "an anchor containing itself": (
        b"jobs:\n  test: &t\n    script: echo\n    env: *t\n",
        2,
        "an anchor contains an alias to itself",
    ),
    "a duplicate key": (
        b"jobs:\n  test:\n    script: echo one\n    script: echo two\n",
        4,
        "duplicate key 'script' (first on line 3)",
    ),
    "a 5,000-digit number": (
        b"jobs:\n  test:\n    script: echo\n    timeout_s: " + b"9" * 5000 + b"\n",
        4,
        "number too long (5000 digits)",
    ),
    "a file over the size cap": (
        b"jobs:\n  test:\n    script: echo\n#" + b"x" * JOBS_FILE_MAX_BYTES + b"\n",
        1,
        f"above the limit of {JOBS_FILE_MAX_BYTES}",
    ),
}


# --- the parser alone ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_jobs_file_is_an_error_naming_its_line(name):
    text, line, says = HOSTILE[name]
    with pytest.raises(JobsFileError) as caught:
        parse_jobs_file(text, filename=JOBS_FILE)
    message = str(caught.value)
    assert message.startswith(f"{JOBS_FILE}:{line}: "), message
    assert says in message, message


@pytest.mark.parametrize(
    "body, line, job",
    [
        ("  ok:\n    script: echo\n  both:\n    script: echo\n    script_path: ci/run.sh\n", 4, "both"),
        ("  ok:\n    script: echo\n  neither:\n    runs_on: alpha\n", 4, "neither"),
    ],
    ids=["script and script_path", "neither"],
)
def test_a_job_needs_exactly_one_of_script_and_script_path(body, line, job):
    with pytest.raises(JobsFileError) as caught:
        parse_jobs_file(("jobs:\n" + body).encode(), filename=JOBS_FILE)
    assert str(caught.value) == f"{JOBS_FILE}:{line}: jobs.{job}: give exactly one of script and script_path"


def _event(
    kind: EventKind, *, branch: str | None = None, tag: str | None = None, pull: int | None = None
) -> ForgeEvent:
    return ForgeEvent(kind, Repo("octo-org", "widgets", CLONE_URL), "a" * 40, branch, tag=tag, pull_number=pull)


def test_on_filters_pick_jobs_by_event_branch_glob_and_tag():
    jobs = parse_jobs_file(EXAMPLE.encode(), filename=JOBS_FILE)
    chosen = {
        label: set(jobs.matching(event))
        for label, event in {
            "push to main": _event(EventKind.PUSH, branch="main"),
            "push to release/1.2": _event(EventKind.PUSH, branch="release/1.2"),
            "push to feature/login": _event(EventKind.PUSH, branch="feature/login"),
            "push of tag v1.4.0": _event(EventKind.PUSH, tag="v1.4.0"),
            "pull request #7 into main": _event(EventKind.PULL_REQUEST, branch="main", pull=7),
        }.items()
    }
    assert chosen == {label: jobs_ for label, (_, _, jobs_) in EVENTS.items()}


def documented_example() -> str:
    """The jobs file docs/forge-bridge.md shows first, as it shows it."""
    text = FORGE_PAGE.read_text()
    start = text.index("# .orchestrator.yaml in the repository\n")
    block = text[start : text.index("```", start)]
    return block.split("\n", 1)[1]


def test_the_documented_example_jobs_file_is_valid_and_its_filter_applies():
    jobs = parse_jobs_file(documented_example().encode(), filename=JOBS_FILE)
    assert jobs.jobs["test"].on.branches == ["main", "release/*"]
    assert set(jobs.matching(_event(EventKind.PUSH, branch="release/1.2"))) == {"test"}
    assert set(jobs.matching(_event(EventKind.PUSH, branch="feature/login"))) == set()


def test_a_job_filtered_to_tags_only_does_not_run_for_branch_pushes():
    # GitHub Actions' rule, and the one the jobs file applies the other way round: with
    # a branch filter and no tag filter, a job is for branches only.
    only_tags = Trigger(tags=["v*"])
    assert only_tags.matches(_event(EventKind.PUSH, tag="v1.4.0"))
    assert not only_tags.matches(_event(EventKind.PUSH, branch="main")), "a tags-only job ran for a push to main"


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture
async def github(tmp_path, prefix, cleanup_topology) -> AsyncIterator[Bridge]:
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    yield bridge
    await bridge.bridge.stop()
    await fake.close()


def signed(event: str, payload: dict) -> tuple[dict[str, str], bytes]:
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers(event, body, SECRET), body


def push(sha: str, ref: str = "refs/heads/main") -> tuple[dict[str, str], bytes]:
    fixture = "push.tag" if ref.startswith("refs/tags/") else "push.branch"
    payload = json.loads(fake_github.fixture(fixture))
    payload.update(after=sha, ref=ref)
    payload["head_commit"]["id"] = sha
    return signed("push", payload)


def pull_request(sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("pull_request.opened"))  # #7, from index-cache into main
    payload["pull_request"]["head"]["sha"] = sha
    return signed("pull_request", payload)


def delivery_of(label: str, sha: str) -> tuple[dict[str, str], bytes]:
    if label.startswith("pull request"):
        return pull_request(sha)
    if label.startswith("push of tag "):
        return push(sha, "refs/tags/" + label.removeprefix("push of tag "))
    return push(sha, "refs/heads/" + label.removeprefix("push to "))


async def settle(bridge: Bridge) -> None:
    """Until every delivery is processed and the bridge's own sender has no status left
    to send."""
    await bridge.bridge.dispatcher.settled()

    async def nothing_to_send() -> bool:
        return await bridge.bridge.journal.next_status_try() is None

    await wait_for(nothing_to_send, what="every status sent")


async def test_each_event_publishes_the_jobs_its_filters_pick_with_every_field(github, daemon_factory):
    daemon = await daemon_factory()
    for label, (sha, _, _) in EVENTS.items():
        github.fake.files[(REPO, sha, JOBS_FILE)] = EXAMPLE.encode()
        status, text = await github.deliver(*delivery_of(label, sha))
        assert status == 202, (label, text)
    await github.bridge.dispatcher.settled()
    runs = {label: await github.bridge.journal.runs_for_commit(REPO, sha) for label, (sha, _, _) in EVENTS.items()}
    assert {label: {run.job_name for run in found} for label, found in runs.items()} == {
        label: jobs for label, (_, _, jobs) in EVENTS.items()
    }
    assert all(run.published for found in runs.values() for run in found)
    for label, (sha, _, _) in EVENTS.items():
        for run in runs[label]:
            await github.fake.wait_for_state(sha, f"orchestrator/{run.job_name}", "success")
    # What each host was asked to run, as its journal holds it.
    taken = {record.job_id: record.request for record in await daemon.journal.in_states(set(JobState))}
    for label, (sha, ref_key, jobs) in EVENTS.items():
        for job in sorted(jobs):
            request_id = str(request_id_for("github", REPO, ref_key, sha, job))
            assert request_id in taken, f"{label}: job {job} did not reach the host"
            request = taken[request_id]
            fields = request.model_dump(
                mode="json",
                include={
                    *JOB_FIELDS[job],
                    "workflow_path",
                    "workflow_job_id",
                    "source",
                    "repo_owner",
                    "repo_name",
                    "repo_url",
                    "commit_sha",
                },
            )
            assert fields == {
                **JOB_FIELDS[job],
                "workflow_path": JOBS_FILE,
                "workflow_job_id": job,
                "source": "github",
                "repo_owner": "octo-org",
                "repo_name": "widgets",
                "repo_url": CLONE_URL,
                "commit_sha": sha,
            }, f"{label}: job {job}"
    assert len(taken) == sum(len(jobs) for _, _, jobs in EVENTS.values())
    assert github.bridge.dispatcher.counts["jobs_published"] == len(taken)


@pytest.mark.parametrize(
    "job",
    [
        "  both:\n    script: make\n    script_path: ci/run.sh\n",
        "  neither:\n    runs_on: alpha\n",
    ],
    ids=["script and script_path", "neither"],
)
async def test_a_job_without_exactly_one_script_is_one_error_status_and_runs_nothing(github, job):
    sha = "6" * 40
    name = job.split(":", 1)[0].strip()
    github.fake.files[(REPO, sha, JOBS_FILE)] = (JOBS + job).encode()  # a valid job before it
    assert (await github.deliver(*push(sha)))[0] == 202
    await github.fake.wait_for_state(sha, "orchestrator", "error")
    await settle(github)
    shown = [s for s in github.fake.statuses if s.sha == sha]
    assert [(s.state, s.context) for s in shown] == [("error", "orchestrator")]
    assert shown[0].description == f"{JOBS_FILE}:6: jobs.{name}: give exactly one of script and script_path"
    assert await github.bridge.journal.runs_for_commit(REPO, sha) == []
    assert github.bridge.dispatcher.counts["jobs_published"] == 0


async def test_hostile_jobs_files_are_one_error_each_and_the_bridge_goes_on(github, daemon_factory):
    await daemon_factory()
    shas = {name: f"{n + 1:x}" * 40 for n, name in enumerate(HOSTILE)}
    for name, (text, _, _) in HOSTILE.items():
        github.fake.files[(REPO, shas[name], JOBS_FILE)] = text
        assert (await github.deliver(*push(shas[name])))[0] == 202, name
    for sha in shas.values():
        await github.fake.wait_for_state(sha, "orchestrator", "error")
    await settle(github)
    for name, (_, line, says) in HOSTILE.items():
        shown = [s for s in github.fake.statuses if s.sha == shas[name]]
        assert [(s.state, s.context) for s in shown] == [("error", "orchestrator")], name
        assert shown[0].description.startswith(f"{JOBS_FILE}:{line}: "), (name, shown[0].description)
        assert says in shown[0].description, (name, shown[0].description)
        assert await github.bridge.journal.runs_for_commit(REPO, shas[name]) == [], name
    assert github.bridge.dispatcher.counts["jobs_published"] == 0
    # Still healthy: the next push runs.
    valid = "f" * 40
    github.fake.files[(REPO, valid, JOBS_FILE)] = JOBS.encode()
    assert (await github.deliver(*push(valid)))[0] == 202
    assert (await github.fake.wait_for_state(valid, "orchestrator/test", "success"))[-1] == "success"
    async with aiohttp.ClientSession() as http, http.get(f"{github.url}/healthz") as response:
        assert response.status == 200
    assert github.bridge.dispatcher.counts["jobs_published"] == 1
