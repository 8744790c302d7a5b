"""The bridge as the service runs it: `python -m orchestrator forge --config <file>` in a
child process. It serves its health page and stops cleanly on SIGTERM; a bad config, an
unreachable broker and a missing secret are one `error:` line and an exit code; and
with JSON logs at INFO, no token or secret ever reaches its log."""

from __future__ import annotations

import json
import time
import uuid

import aiohttp

from orchestrator.host.journal import JobState
from tests.conftest import AMQP_URL
from tests.support.fakeforge import FakeForge
from tests.support.fakeforge import github as fake_github
from tests.support.forgebridge import (
    SECRET,
    BridgeProcess,
    deliver_to,
    run_forge_command,
    write_config,
)
from tests.web.test_httpapi import free_port

REPO = "octo-org/widgets"


def bridge_env(prefix: str, fake: FakeForge, **extra: str) -> dict[str, str]:
    return {
        "AMQP_URL": AMQP_URL,
        "AMQP_PREFIX": prefix,
        "TEST_FORGE_TOKEN": fake.token,
        "TEST_FORGE_SECRET": SECRET,
        "LOG_FORMAT": "json",
        **extra,
    }


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


async def test_the_service_serves_healthz_and_stops_on_sigterm_with_exit_0(tmp_path, prefix, cleanup_topology):
    fake = await fake_github.install(FakeForge()).start()
    port = free_port()
    config = write_config(
        tmp_path, forge="github", kind="github", api_url=fake.url, repo=REPO, listen=f"127.0.0.1:{port}"
    )
    try:
        bridge = await BridgeProcess(config, bridge_env(prefix, fake)).start()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200 and (await response.json()) == {"status": "ok"}
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 200, await response.text()
        began = time.monotonic()
        assert await bridge.stop(timeout_s=10) == 0
        took = time.monotonic() - began
        assert took < 5, f"SIGTERM took {took:.1f} s"
        assert bridge.events("forge.stopped"), "the bridge logs that it stopped"
        assert not [line for line in bridge.lines if "Traceback" in line]
    finally:
        await fake.close()


async def test_a_bad_config_is_one_error_line_and_exit_2(tmp_path):
    config = write_config(tmp_path, forge="github", kind="github", api_url="http://127.0.0.1:9", repo=REPO)
    config.write_text(config.read_text().replace("listen:", "listn:"))
    code, out, err = await run_forge_command(
        "--config", str(config), env={"TEST_FORGE_TOKEN": "t", "TEST_FORGE_SECRET": "s"}
    )
    assert code == 2
    assert err.splitlines() == [f"error: {config}:1: listn: unknown key"]
    assert out == ""


async def test_an_unreachable_broker_is_one_error_line_and_exit_1(tmp_path, prefix):
    config = write_config(tmp_path, forge="github", kind="github", api_url="http://127.0.0.1:9", repo=REPO)
    env = {
        "TEST_FORGE_TOKEN": "t",
        "TEST_FORGE_SECRET": "s",
        "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        "AMQP_PREFIX": prefix,
        "BROKER_CONNECT_TIMEOUT_S": "2",
    }
    began = time.monotonic()
    code, _, err = await run_forge_command("--config", str(config), env=env)
    took = time.monotonic() - began
    assert code == 1, err
    [line] = error_lines(err)
    assert line.startswith("error: cannot connect to the broker at amqp://guest:****@127.0.0.1:1/ within 2 s"), line
    assert "Traceback" not in err
    assert "guest:guest" not in err, "the broker's password is never shown"
    assert took < 15, f"gave up after {took:.1f} s"


async def test_forge_check_names_the_key_and_the_variable_of_a_missing_token(tmp_path, monkeypatch):
    monkeypatch.delenv("TEST_FORGE_TOKEN", raising=False)
    config = write_config(tmp_path, forge="github", kind="github", api_url="http://127.0.0.1:9", repo=REPO)
    code, out, err = await run_forge_command("check", "--config", str(config), env={"TEST_FORGE_SECRET": "s"})
    assert code == 2
    [line] = err.splitlines()
    assert line == f"error: {config}:7: forges.github.token: environment variable TEST_FORGE_TOKEN is empty or not set"
    assert out == ""


# --- secrets ----------------------------------------------------------------------------------------
JOBS = """\
jobs:
  deploy:
    runs_on: alpha
    env: {STAGE: test}
    script: ./deploy.sh "$DEPLOY_KEY"
"""


def sha_of(body: bytes) -> str:
    payload = json.loads(body)
    return payload["after"] if "after" in payload else payload["pull_request"]["head"]["sha"]


async def test_no_token_or_secret_reaches_the_log_and_the_push_gets_its_job_secret(
    tmp_path, prefix, cleanup_topology, daemon_factory
):
    token, secret, deploy_key = (f"{kind}-{uuid.uuid4().hex}" for kind in ("ghp", "whsec", "deploy"))
    fake = await fake_github.install(FakeForge(token=token)).start()
    port = free_port()
    config = write_config(
        tmp_path,
        forge="github",
        kind="github",
        api_url=fake.url,
        repo=REPO,
        listen=f"127.0.0.1:{port}",
        forks=True,
        secrets={"DEPLOY_KEY": {"env": "WIDGETS_DEPLOY_KEY"}},
    )
    env = bridge_env(prefix, fake, TEST_FORGE_SECRET=secret, WIDGETS_DEPLOY_KEY=deploy_key)
    url = f"http://127.0.0.1:{port}"
    try:
        daemon = await daemon_factory()
        bridge = await BridgeProcess(config, env).start()
        runs = {}
        # What else logs: a status the forge refuses (the branch_created push's "queued"),
        # a jobs file the forge fails to serve once, one that does not validate, a bad signature.
        created = sha_of(fake_github.fixture("push.branch_created"))
        fake.fail_next(1, status=422, path_prefix=f"/repos/{REPO}/statuses/{created}")
        for name in ("push.branch", "pull_request.opened", "pull_request.opened.fork", "push.branch_created"):
            headers, body = fake_github.delivery(name, secret)
            runs[name] = sha_of(body)
            fake.files[(REPO, runs[name], ".orchestrator.yaml")] = JOBS.encode()
            assert (await deliver_to(url, "github", headers, body))[0] == 202, name
        headers, body = fake_github.delivery("push.tag", secret)
        invalid = sha_of(body)
        fake.files[(REPO, invalid, ".orchestrator.yaml")] = b"jobs:\n  deploy:\n    script: x\n    scrip: y\n"
        fake.fail_next(1, status=500, path_prefix=f"/repos/{REPO}/contents/")
        assert (await deliver_to(url, "github", headers, body))[0] == 202
        headers, body = fake_github.delivery("push.branch", "not-the-secret")
        assert (await deliver_to(url, "github", headers, body))[0] == 401
        await fake.wait_for_state(invalid, "orchestrator", "error")
        for sha in runs.values():
            await fake.wait_for_state(sha, "orchestrator/deploy", "success")
        assert await bridge.stop(timeout_s=10) == 0
        log = "".join(bridge.lines)
        for event in (
            "forge.started",
            "webhook.accepted",
            "webhook.bad_signature",
            "job.published",
            "status.set",
            "status.dropped",
            "delivery.jobs_file_unreadable",
        ):
            assert bridge.events(event), f"the log at INFO has {event}"
        assert token not in log, "the API token was logged"
        assert secret not in log, "the webhook secret was logged"
        assert deploy_key not in log, "the job secret was logged"
        envs = {
            record.request.commit_sha: record.request.env for record in await daemon.journal.in_states(set(JobState))
        }
        assert envs[runs["push.branch"]] == {"STAGE": "test", "DEPLOY_KEY": deploy_key}
        assert envs[runs["pull_request.opened"]] == {"STAGE": "test", "DEPLOY_KEY": deploy_key}
        assert envs[runs["pull_request.opened.fork"]] == {"STAGE": "test"}, "a fork's job never gets secrets"
    finally:
        await fake.close()
