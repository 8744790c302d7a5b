"""Soak: webhooks lost at random and a bridge killed at random moments still end with
every branch head run once, every answered webhook run once, and one final status per
job on the forge.

200 pushes across 3 repositories of a fake GitHub (each moves a branch head in the fake
and sends its webhook, except every 4th whose webhook is lost), while the bridge — a
subprocess, `python -m orchestrator forge` — is SIGKILLed and restarted 5 times at
moments drawn from a seeded RNG (pushes made while it is down lose their webhooks too).
A noop daemon runs the jobs. After the last restart one `forge catch-up` pass
(`catch_up_once`) runs beside the bridge. Bounded: every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import sys
import textwrap
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from orchestrator.forge.config import load_forge_config
from orchestrator.forge.planner import request_id_for
from tests.conftest import AMQP_URL, make_settings, wait_for
from tests.support.fakeforge import FakeForge
from tests.support.fakeforge import github as fake_github
from tests.support.forgebridge import SECRET

ROOT = Path(__file__).resolve().parents[2]
SEED = 20261125
PUSHES = 200
KILLS = 5
REPOS = ["soak/r0", "soak/r1", "soak/r2"]
BRANCHES = ["main", "b1", "b2", "b3"]
CONTEXT = "orchestrator/test"
FINAL = frozenset({"success", "failure", "error"})
JOBS = b"jobs:\n  test:\n    runs_on: alpha\n    script: make test\n"
Key = tuple[str, str, str]  # (repository, ref key, commit)


class BridgeProcess:
    """`python -m orchestrator forge` as a subprocess, its JSON log lines kept."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        self.config = config
        self.env = {**os.environ, "LOG_FORMAT": "json", **env}
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.starts = 0
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self, timeout_s: float = 30) -> None:
        self._started.clear()
        self.starts += 1
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "forge",
            "--config",
            str(self.config),
            env=self.env,
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read(self.process))
        started = asyncio.create_task(self._started.wait())
        exited = asyncio.create_task(self.process.wait())
        await asyncio.wait({started, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        exited.cancel()
        if not self._started.is_set():
            await self.kill()
            raise AssertionError(
                f"the bridge did not log forge.started within {timeout_s:g} s; its last lines:\n"
                + "".join(self.lines[-20:])
            )

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            if '"forge.started"' in text:
                self._started.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    async def kill(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self, timeout_s: float = 30) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            await self.kill()
            raise AssertionError(f"the bridge did not stop within {timeout_s:g} s of SIGTERM") from None
        if self._reader is not None:
            await self._reader
        return code


@pytest.fixture
async def bridges() -> AsyncIterator[list[BridgeProcess]]:
    """Bridge processes a test starts; any still running at its end are killed."""
    started: list[BridgeProcess] = []
    yield started
    for bridge in started:
        await bridge.kill()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(tmp_path: Path, api_url: str, port: int) -> Path:
    path = tmp_path / "forge.yaml"
    repositories = "".join(f"  - {{repo: {repo}, forge: github}}\n" for repo in REPOS)
    path.write_text(
        textwrap.dedent(f"""\
        listen: 127.0.0.1:{port}
        state_dir: {tmp_path / "forge-state"}
        forges:
          github:
            api_url: {api_url}
            token: {{env: TEST_FORGE_TOKEN}}
            webhook_secret: {{env: TEST_FORGE_SECRET}}
            catchup_interval_s: 10
        repositories:
        """)
        + repositories
    )
    return path


def push_webhook(repo: str, branch: str, sha: str, number: int) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("push.branch"))
    owner, name = repo.split("/")
    payload.update(after=sha, ref=f"refs/heads/{branch}")
    payload["repository"].update(full_name=repo, name=name, clone_url=f"https://github.com/{repo}.git")
    payload["repository"]["owner"].update(login=owner, name=owner)
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("push", body, SECRET, delivery=f"soak-{number}"), body


def commit(label: str) -> str:
    return hashlib.sha1(label.encode()).hexdigest()


async def test_pushes_with_lost_webhooks_and_a_bridge_killed_five_times_all_run_once(
    tmp_path, prefix, cleanup_topology, daemon_factory, broker, bridges
):
    rng = random.Random(SEED)
    fake = await fake_github.install(FakeForge()).start()
    run_of: dict[str, Key] = {}  # request id -> what it runs

    def move(repo: str, branch: str, sha: str) -> None:
        fake.branches[repo][branch] = sha
        fake.files[(repo, sha, ".orchestrator.yaml")] = JOBS
        ref = f"branch/{branch}"
        run_of[str(request_id_for("github", repo, ref, sha, "test"))] = (repo, ref, sha)

    for repo in REPOS:
        fake.branches[repo] = {}
        for branch in BRANCHES:
            move(repo, branch, commit(f"{repo}/{branch}/initial"))
    port = free_port()
    config = write_config(tmp_path, fake.url, port)
    env = {"AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix, "TEST_FORGE_TOKEN": fake.token, "TEST_FORGE_SECRET": SECRET}
    bridge = BridgeProcess(config, env)
    bridges.append(bridge)
    daemon = await daemon_factory()
    await broker.open()
    try:
        await bridge.start()
        # The first pass records the heads and runs nothing; the pushes come after it.
        await wait_for(
            lambda: {e["repo"] for e in bridge.events("catchup.pass") if e["first_pass"]} == set(REPOS),
            what="the first pass over the three repositories",
            timeout_s=30,
        )

        answered: set[Key] = set()  # webhooks answered 202: each must run
        unsure: set[Key] = set()  # cut off by a kill mid-request: may run
        # One kill in each fifth of the pushes, at least 6 pushes apart: the bridge is up again by then.
        span = (PUSHES - 20) // KILLS
        kill_after = {10 + span * n + rng.randrange(span - 6) for n in range(KILLS)}
        down_for = 0  # pushes still to make while the bridge is down
        url = f"http://127.0.0.1:{port}/hooks/github"
        connector = aiohttp.TCPConnector(force_close=True)  # a refused connection means "not taken"
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http:
            for number in range(PUSHES):
                repo, branch = rng.choice(REPOS), rng.choice(BRANCHES)
                sha = commit(f"{repo}/{branch}/{number}")
                move(repo, branch, sha)
                key = (repo, f"branch/{branch}", sha)
                if number % 4 != 3 and bridge.running:
                    headers, body = push_webhook(repo, branch, sha, number)
                    try:
                        async with http.post(url, data=body, headers=headers) as response:
                            assert response.status == 202, (response.status, await response.text())
                            answered.add(key)
                    except aiohttp.ClientConnectorError:
                        pass  # lost, as GitHub would lose it
                    except (aiohttp.ClientError, TimeoutError):
                        unsure.add(key)
                if number in kill_after:
                    await asyncio.sleep(rng.uniform(0, 0.25))  # whatever the bridge is in the middle of
                    await bridge.kill()
                    down_for = rng.randint(1, 4)
                elif not bridge.running:
                    down_for -= 1
                    if down_for <= 0:
                        await bridge.start()
                await asyncio.sleep(rng.uniform(0, 0.05))
        if not bridge.running:
            await bridge.start()
        assert bridge.starts == KILLS + 1

        from orchestrator.forge.service import catch_up_once

        loaded = load_forge_config(config, environ={**os.environ, **env})
        settings = make_settings(prefix, tmp_path / "unused", tmp_path / "unused.yaml")
        final_pass = await asyncio.wait_for(catch_up_once(settings, loaded, repo=None, dry_run=False), 60)
        assert not [report.error for report in final_pass if report.error]

        heads = {(repo, f"branch/{branch}", sha) for repo in REPOS for branch, sha in fake.branches[repo].items()}
        must_run = answered | heads
        results: dict[Key, int] = Counter()

        def all_ran() -> bool:
            while not broker.results.empty():
                result = broker.results.get_nowait()
                results[run_of[str(result.request_id)]] += 1
            return must_run <= set(results)

        async def settled() -> bool:
            return (
                all_ran()
                and not daemon.runner.running
                and await broker.ready_count("alpha") == 0
                and all(set(fake.statuses_for(sha, CONTEXT)) & FINAL for _, _, sha in results)
            )

        try:
            await wait_for(
                all_ran, what="a result for every head and every answered webhook", timeout_s=60, interval_s=0.1
            )
            await wait_for(
                settled,
                what="the daemon idle and a final status on every commit that ran",
                timeout_s=30,
                interval_s=0.1,
            )
        except AssertionError as exc:
            missing = sorted(must_run - set(results))
            unfinished = sorted(sha for _, _, sha in results if not set(fake.statuses_for(sha, CONTEXT)) & FINAL)
            raise AssertionError(
                f"{exc}; no result for {len(missing)}: {missing[:5]}; "
                f"no final status on {len(unfinished)}: {unfinished[:5]}"
            ) from None
        assert await bridge.stop() == 0
        all_ran()  # anything that came in meanwhile

        missing = must_run - set(results)
        twice = {key: n for key, n in results.items() if n != 1}
        assert not missing and not twice and not broker.conflicts, (missing, twice, broker.conflicts)
        pushed = set(run_of.values())
        assert set(results) <= pushed
        # One final status per job, and the commit ends on it. A status is sent at least
        # once: a bridge killed between the forge's answer and its journal sends it again
        # (the same status: counted, allowed).
        wrong, resent = {}, 0
        for _, _, sha in sorted(results):
            shown = [
                (s.state, s.description, s.target_url) for s in fake.statuses if s.sha == sha and s.context == CONTEXT
            ]
            finals = {status for status in shown if status[0] in FINAL}
            resent += sum(1 for status in shown if status[0] in FINAL) - len(finals)
            if len(finals) != 1 or shown[-1][0] != "success":
                wrong[sha] = [status[:2] for status in shown]
        assert not wrong, f"{len(wrong)} commit(s) do not end on their one final status: {wrong}"
        caught_up = sum(e["ran"] for e in bridge.events("catchup.pass"))
        print(
            f"\nsoak: {PUSHES} pushes, {len(answered)} webhooks answered, {len(unsure)} cut off, "
            f"{len(must_run)} runs required, {len(results)} ran ({len(results) - len(must_run)} more were heads "
            f"a pass saw), {caught_up} by the bridge's passes, {sum(len(r.ran) for r in final_pass)} by the final one; "
            f"{bridge.starts} bridge starts; "
            f"{broker.redeliveries} result redeliveries; {len(fake.statuses)} statuses set, {resent} final ones resent"
        )
    finally:
        await bridge.kill()
        await fake.close()
