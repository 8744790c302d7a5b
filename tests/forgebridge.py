"""A forge bridge under test: a fake forge, the bridge's config file, the bridge itself
(in-process, on the real broker), and a way to deliver webhooks to it."""

from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from orchestrator.forge.config import load_forge_config
from orchestrator.forge.service import ForgeBridge
from tests.conftest import make_settings
from tests.fakeforge import FakeForge

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
    tmp_path: Path, *, forge: str, kind: str, api_url: str, repo: str, top: dict[str, Any] | None = None, **repo_options: Any
) -> Path:
    options = "".join(f"    {key}: {json.dumps(value)}\n" for key, value in repo_options.items())
    top_level = "".join(f"{key}: {json.dumps(value)}\n" for key, value in (top or {}).items())
    path = tmp_path / "forge.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen: 127.0.0.1:0
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
        """) + options + top_level)
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
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/hooks/{self.forge}", data=body, headers=headers) as response:
                return response.status, await response.text()


async def start_bridge(prefix: str, tmp_path: Path, fake: FakeForge, config: Path, *, forge: str, **settings: Any) -> Bridge:
    env = {**os.environ, "TEST_FORGE_TOKEN": fake.token, "TEST_FORGE_SECRET": SECRET}
    loaded = load_forge_config(config, environ=env)
    bridge = ForgeBridge(make_settings(prefix, tmp_path / "unused", tmp_path / "unused.yaml", **settings), loaded)
    await bridge.start()
    return Bridge(bridge, fake, forge)
