"""Cancel through `orchestrator cancel`: running, queued, finished and unknown jobs."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

from orchestrator.core.messages import JobStatus
from tests.conftest import AMQP_URL, wait_for

ROOT = Path(__file__).resolve().parents[2]


async def cancel(prefix: str, job_id: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "cancel",
        job_id,
        "--answer-timeout",
        "1.5",
        env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    return process.returncode, stdout.decode() + stderr.decode()


async def test_cancel_running_queued_finished_and_unknown(daemon_factory, broker, prefix):
    daemon = await daemon_factory(capacity_map={"alpha": 1})
    await broker.open()
    running = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang"})
    await wait_for(lambda: daemon.ledger.running_for("alpha") == 1, what="the alpha job to be running")
    queued = await broker.submit(runs_on="alpha")
    await wait_for(lambda: not daemon.scheduler.consuming()["alpha"], what="the full alpha label to stop consuming")

    code, out = await cancel(prefix, queued.job_id)
    assert code == 0 and "not running on any of the 1 host(s)" in out and "dropped" in out
    code, out = await cancel(prefix, running.job_id)
    assert code == 0 and f"job {running.job_id}: cancelling on host0" in out

    results = await broker.collect(2, timeout_s=20)
    assert results[running.job_id].status is JobStatus.CANCELLED
    assert results[queued.job_id].status is JobStatus.CANCELLED
    assert results[queued.job_id].summary == "cancelled before a host started it"
    assert await daemon.router.list_ours() == []

    code, out = await cancel(prefix, running.job_id)
    assert code == 1 and "already finished on host0 (cancelled)" in out
    code, out = await cancel(prefix, str(uuid.uuid4()))
    assert code == 0 and "not running on any of the 1 host(s) that answered" in out
    code, out = await cancel(prefix, "not-a-uuid")
    assert code == 2 and "is not a UUID" in out


async def test_cancels_are_remembered_across_a_restart(daemon_factory, broker, prefix, tmp_path):
    first = await daemon_factory(host_name="same")
    job_id = str(uuid.uuid4())
    code, _ = await cancel(prefix, job_id)
    assert code == 0
    await first.stop()
    await daemon_factory(host_name="same")
    await broker.open()
    await broker.submit(runs_on="beta", request_id=job_id)
    result = await broker.next_result()
    assert result.status is JobStatus.CANCELLED


async def test_hosts_lists_every_daemon_with_its_capacity(daemon_factory, broker, prefix):
    await daemon_factory(host_name="hv-a", max_concurrency=3)
    await daemon_factory(host_name="hv-b", max_concurrency=5, capacity_map={"beta": 0})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "hosts",
        "--answer-timeout",
        "1.5",
        env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    lines = stdout.decode().splitlines()
    assert process.returncode == 0
    assert lines[0].startswith("hv-a: serving, 0/3 jobs, 0/64 vCPUs") and lines[0].endswith("labels alpha, beta")
    assert lines[1].startswith("hv-b: serving, 0/5 jobs") and lines[1].endswith("labels alpha")
    assert lines[2] == "2 host(s) answered within 1.5 s"
