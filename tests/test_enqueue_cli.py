"""`orchestrator enqueue` as a user runs it, against a running daemon and the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from tests.conftest import AMQP_URL, SHA

ROOT = Path(__file__).resolve().parent.parent


async def enqueue(prefix: str, config: Path, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "orchestrator", "enqueue", "--config", str(config),
        "--repo", "https://example.invalid/r.git", "--commit", SHA, *args,
        env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_enqueue_wait_prints_the_result_and_exits_with_the_job_status(daemon_factory, prefix, noop_map_path):
    await daemon_factory()
    code, out, _ = await enqueue(prefix, noop_map_path, "--runs-on", "a", "--env", "NOOP_EXIT_CODE=3", "--wait")
    assert code == 1
    assert out.splitlines()[0].endswith("failed (exit code 3) on host0: job script exited with 3")
    result = json.loads(out[out.index("{"):])
    assert result["status"] == "failed" and result["label"] == "alpha"
    code, out, _ = await enqueue(prefix, noop_map_path, "--wait")
    assert code == 0 and "succeeded" in out.splitlines()[0]


async def test_enqueue_without_wait_prints_the_job_id(daemon_factory, prefix, noop_map_path, broker):
    await daemon_factory()
    await broker.open()
    code, out, err = await enqueue(prefix, noop_map_path, "--runs-on", "beta")
    assert code == 0 and "routing key 'beta'" in err
    result = await broker.next_result()
    assert str(result.request_id) == out.strip()


async def test_enqueue_before_any_daemon_says_so(prefix, noop_map_path):
    code, _, err = await enqueue(prefix, noop_map_path, "--runs-on", "beta")
    assert code == 2
    assert err.startswith("error: exchange ") and "no orchestrator daemon" in err
