"""`orchestrator enqueue` as a user runs it, against a running daemon and the real broker."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, SHA

ROOT = Path(__file__).resolve().parents[2]
# Linux refuses one argv string above MAX_ARG_STRLEN (32 pages: 128 KiB).
MAX_ARGUMENT_BYTES = 128 * 1024


async def enqueue(prefix: str, config: Path, *args: str, stdin: bytes = b"") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "enqueue",
        "--config",
        str(config),
        "--repo",
        "https://example.invalid/r.git",
        "--commit",
        SHA,
        *args,
        env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix},
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    return process.returncode, stdout.decode(), stderr.decode()


def long_script(size: int) -> str:
    return "".join(f"echo line {n}: {'x' * 60}\n" for n in range(size // 60))[:size]


async def test_enqueue_wait_prints_the_result_and_exits_with_the_job_status(daemon_factory, prefix, noop_map_path):
    await daemon_factory()
    code, out, _ = await enqueue(prefix, noop_map_path, "--runs-on", "a", "--env", "NOOP_EXIT_CODE=3", "--wait")
    assert code == 1
    assert out.splitlines()[0].endswith("failed (exit code 3) on host0: job script exited with 3")
    result = json.loads(out[out.index("{") :])
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


async def test_script_too_long_for_an_argument_is_enqueued_from_a_file(daemon_factory, prefix, noop_map_path, tmp_path):
    daemon = await daemon_factory()
    script = long_script(200 * 1024)
    assert len(script.encode()) == 200 * 1024 > MAX_ARGUMENT_BYTES
    with pytest.raises(OSError) as too_long:  # why --script-file exists
        await enqueue(prefix, noop_map_path, "--script", script)
    assert too_long.value.errno == errno.E2BIG
    path = tmp_path / "job.sh"
    path.write_text(script)
    code, out, _ = await enqueue(prefix, noop_map_path, "--script-file", str(path), "--wait")
    assert code == 0 and "succeeded" in out.splitlines()[0]
    job_id = json.loads(out[out.index("{") :])["request_id"]
    record = await daemon.journal.get(job_id)
    assert record is not None and record.request is not None and record.request.script == script


async def test_script_file_dash_reads_the_script_from_stdin(daemon_factory, prefix, noop_map_path):
    daemon = await daemon_factory()
    script = "#!/bin/sh\necho 'from stdin: é'\n"
    code, out, _ = await enqueue(prefix, noop_map_path, "--script-file", "-", "--wait", stdin=script.encode())
    assert code == 0 and "succeeded" in out.splitlines()[0]
    record = await daemon.journal.get(json.loads(out[out.index("{") :])["request_id"])
    assert record is not None and record.request is not None and record.request.script == script


async def test_unreadable_script_file_is_one_line_and_exit_2(prefix, noop_map_path, tmp_path):
    code, out, err = await enqueue(prefix, noop_map_path, "--script-file", str(tmp_path / "missing.sh"))
    assert (code, out) == (2, "")
    assert err == f"error: --script-file {str(tmp_path / 'missing.sh')!r}: cannot read it: No such file or directory\n"


async def test_bad_env_name_is_one_line_and_exit_2(prefix, noop_map_path):
    code, out, err = await enqueue(prefix, noop_map_path, "--env", "BAD-NAME=x")
    assert (code, out) == (2, "")
    assert err.startswith("error: --env 'BAD-NAME=x': BAD-NAME is not a valid variable name (") and err.count("\n") == 1
