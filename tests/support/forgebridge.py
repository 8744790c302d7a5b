"""A forge bridge under test: a fake forge, the bridge's config file, the bridge itself
(in-process, on the real broker, or as `orchestrator forge` in a child process), and a
way to deliver webhooks to it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator.forge.config import load_forge_config
from orchestrator.forge.service import ForgeBridge
from tests.conftest import make_settings
from tests.support.daemonproc import ROOT, DaemonProcess
from tests.support.fakeforge import FakeForge

TOKEN = "forge-api-token"
SECRET = "webhook-secret"
# The job runs for a second, so each step (queued, running, done) is on the commit
# before the next replaces it: the bridge sends only the newest status of a context.
JOBS = """\
jobs:
  test:
    runs_on: alpha
    env: {GREETING: hello, NOOP_DURATION_S: "1"}
    script: echo $GREETING
"""


def write_config(
    tmp_path: Path,
    *,
    forge: str,
    kind: str,
    api_url: str,
    repo: str,
    listen: str = "127.0.0.1:0",
    top: dict[str, Any] | None = None,
    **repo_options: Any,
) -> Path:
    options = "".join(f"    {key}: {json.dumps(value)}\n" for key, value in repo_options.items())
    top_level = "".join(f"{key}: {json.dumps(value)}\n" for key, value in (top or {}).items())
    path = tmp_path / "forge.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        listen: {listen}
        state_dir: {tmp_path / "forge-state"}
        forges:
          {forge}:
            kind: {kind}
            api_url: {api_url}
            token: {{env: TEST_FORGE_TOKEN}}
            webhook_secret: {{env: TEST_FORGE_SECRET}}
        repositories:
          - repo: {repo}
            forge: {forge}
        """)
        + options
        + top_level
    )
    return path


@dataclass
class Bridge:
    bridge: ForgeBridge
    fake: FakeForge
    forge: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.bridge.port}"

    async def deliver(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        return await deliver_to(self.url, self.forge, headers, body)


async def deliver_to(url: str, forge: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
    """POST a webhook to the bridge at `url`: (status, body text)."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/hooks/{forge}", data=body, headers=headers) as response:
            return response.status, await response.text()


async def start_bridge(
    prefix: str, tmp_path: Path, fake: FakeForge, config: Path, *, forge: str, **settings: Any
) -> Bridge:
    env = {**os.environ, "TEST_FORGE_TOKEN": fake.token, "TEST_FORGE_SECRET": SECRET}
    loaded = load_forge_config(config, environ=env)
    bridge = ForgeBridge(make_settings(prefix, tmp_path / "unused", tmp_path / "unused.yaml", **settings), loaded)
    await bridge.start()
    return Bridge(bridge, fake, forge)


class BridgeProcess(DaemonProcess):
    """`python -m orchestrator forge --config <file>` as a child process, for tests that
    signal or kill it. Recorded in `DaemonProcess.started`, so conftest's fixture kills
    what a failed test left running. `lines` is its whole stderr."""

    def __init__(self, config: Path, env: dict[str, str]) -> None:
        super().__init__(env)
        self.config = config

    async def start(self, timeout_s: float = 60) -> BridgeProcess:
        self._started.clear()
        self.lines = []
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
            if self.process.returncode is not None:
                await self._reader
            tail = "".join(self.lines[-20:])
            raise AssertionError(
                f"the bridge did not log forge.started within {timeout_s:g} s; its last lines:\n{tail}"
            )
        return self

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            if '"forge.started"' in text:
                self._started.set()


async def run_forge_command(*args: str, env: dict[str, str], timeout_s: float = 60) -> tuple[int, str, str]:
    """`python -m orchestrator forge <args>` to its end: (exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "forge",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"orchestrator forge {' '.join(args)} did not end within {timeout_s:g} s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")
