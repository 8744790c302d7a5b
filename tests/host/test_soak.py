"""Soak, bounded in time: 500 noop jobs while the daemon is SIGKILLed every few seconds
and the broker is restarted once. At the end every job has exactly one outcome (a
result redelivered with the same message_id and body counts once), and nothing is left
in the queue."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from pathlib import Path

from orchestrator.core.messages import JobStatus
from tests.host.test_broker_faults import rabbitmqctl
from tests.host.test_reliability import daemon_env
from tests.support.daemonproc import DaemonProcess

JOBS = 500


def missing_story(missing: set[str], journal: Path, daemons: list[DaemonProcess]) -> str:
    """What the journal and the daemons' logs say about jobs without a result."""
    lines = []
    with sqlite3.connect(journal) as db:
        for job_id in sorted(missing):
            row = db.execute(
                "SELECT state, attempt, accepted_at, started_at, finished_at FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            lines.append(f"{job_id}: journal {row}")
            for n, daemon in enumerate(daemons):
                lines += [f"  daemon {n}: {line.strip()}" for line in daemon.lines if job_id in line]
    return "\n".join(lines)


async def test_soak_kills_and_a_broker_restart_lose_and_duplicate_nothing(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    rng = random.Random(7)
    env = daemon_env(
        prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop", MAX_CONCURRENCY="8", MAX_ATTEMPTS="20"
    )
    daemon = await DaemonProcess(env).start()
    daemons = [daemon]
    await broker.open()
    jobs = [
        await broker.submit(
            runs_on=rng.choice(["alpha", "beta"]), env={"NOOP_DURATION_S": f"{rng.uniform(0.1, 0.5):.2f}"}
        )
        for _ in range(JOBS)
    ]
    results: dict[str, object] = {}
    kills = 0
    broker_restarted = False

    async def killer() -> None:
        nonlocal daemon, kills, broker_restarted
        while True:
            await asyncio.sleep(rng.uniform(1.5, 3.0))
            await daemon.kill()
            kills += 1
            if not broker_restarted and len(results) > JOBS // 3:
                await rabbitmqctl("stop_app")
                await rabbitmqctl("start_app")
                await rabbitmqctl("await_startup")
                broker_restarted = True
            daemon = await DaemonProcess(env).start()
            daemons.append(daemon)

    async def collect_all() -> None:
        while len(results) < JOBS:
            results.update(await broker.collect(1, timeout_s=300))

    chaos = asyncio.create_task(killer(), name="killer")
    collecting = asyncio.create_task(collect_all(), name="collect-results")
    try:
        done, _ = await asyncio.wait({chaos, collecting}, timeout=300, return_when=asyncio.FIRST_COMPLETED)
        if chaos in done:
            chaos.result()  # the killer died (a daemon that would not start): fail with its error now
        assert collecting in done, f"waited 300 s for {JOBS} results, got {len(results)}:\n" + missing_story(
            {j.job_id for j in jobs} - set(results), tmp_path / "state" / "state.db", daemons
        )
        collecting.result()
    finally:
        for task in (chaos, collecting):
            task.cancel()
        await asyncio.gather(chaos, collecting, return_exceptions=True)
    assert await daemon.stop() == 0
    assert set(results) == {j.job_id for j in jobs}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert not broker.conflicts
    assert kills >= 3 and broker_restarted
    assert await broker.ready_count("alpha") == 0 and await broker.ready_count("beta") == 0
    print(
        f"soak: {JOBS} jobs, {kills} kills, 1 broker restart, {broker.redeliveries} result redeliveries, "
        f"{sum(r.attempt > 1 for r in results.values())} jobs re-run"
    )
