"""Broker faults with jobs running: every connection closed by force, and the broker
application restarted. Jobs keep running, results arrive once the broker is back, and
intake resumes."""

from __future__ import annotations

import asyncio
import subprocess

from orchestrator.messages import JobStatus
from tests.conftest import wait_for


async def rabbitmqctl(*args: str) -> None:
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


async def _jobs_survive(daemon_factory, broker, fault) -> None:
    daemon = await daemon_factory(max_concurrency=4)
    await broker.open()
    jobs = [await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "3"}) for _ in range(4)]
    await wait_for(lambda: daemon.ledger.running == 4, timeout_s=20)
    await fault()
    results = await broker.collect(4, timeout_s=90)
    assert set(results) == {j.job_id for j in jobs}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    # Intake came back: consumers are live again with a working prefetch.
    after = [await broker.submit(runs_on=label) for label in ("alpha", "beta", "alpha")]
    more = await broker.collect(3, timeout_s=60)
    assert set(more) == {j.job_id for j in after}
    assert not broker.conflicts
    assert daemon.ledger.peak_running <= 4


async def test_close_all_connections_mid_job(daemon_factory, broker):
    await _jobs_survive(daemon_factory, broker, lambda: rabbitmqctl("close_all_connections", "test: forced close"))


async def test_broker_restart_mid_job(daemon_factory, broker):
    async def restart() -> None:
        await rabbitmqctl("stop_app")
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")

    await _jobs_survive(daemon_factory, broker, restart)
