"""Capacity against the real broker: limits hold (measured at the backend), a full label
does not block another, hosts share work and hold none they cannot start, SIGTERM drains."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections import Counter
from pathlib import Path

import aio_pika

from hypervisors.base import BackendName
from hypervisors.noop import NoopHypervisor
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobStatus
from orchestrator.host.daemon import Daemon
from orchestrator.host.runner import StopReason
from tests.conftest import AMQP_URL, make_settings, wait_for
from tests.support.fakes.counting_noop import CountingNoop


async def start_daemon(prefix, tmp_path, noop_map_path, host, backend, **overrides) -> Daemon:
    settings = make_settings(prefix, tmp_path / host, noop_map_path, host_name=host, **overrides)
    daemon = Daemon(settings, load_image_map(noop_map_path), backends={BackendName.NOOP: backend})
    await daemon.start()
    return daemon


async def test_concurrency_never_exceeds_global_and_label_limits(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    backend = CountingNoop()
    daemon = await start_daemon(
        prefix, tmp_path, noop_map_path, "h", backend, max_concurrency=3, capacity_map={"alpha": 2}
    )
    await broker.open()
    for i in range(12):
        label = "alpha" if i % 2 else "beta"
        await broker.submit(runs_on=label, env={"LABEL": label, "NOOP_DURATION_S": "0.15"})
    results = await broker.collect(12)
    await daemon.stop()
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert sum(backend.starts.values()) == 12
    # Counted by the backend, not the ledger: the limits were reached and never exceeded.
    assert backend.peak_alive == 3
    assert backend.peak_by_label["alpha"] == 2


async def test_full_label_does_not_block_other_label(prefix, tmp_path, noop_map_path, cleanup_topology, broker):
    backend = CountingNoop()
    daemon = await start_daemon(
        prefix, tmp_path, noop_map_path, "h", backend, max_concurrency=4, capacity_map={"alpha": 1}
    )
    await broker.open()
    blocker = await broker.submit(runs_on="alpha", env={"LABEL": "alpha", "NOOP_FAIL": "hang"}, timeout_s=30)
    await wait_for(lambda: daemon.ledger.running_for("alpha") == 1, what="the blocker to be running")
    waiting = [await broker.submit(runs_on="alpha", env={"LABEL": "alpha"}) for _ in range(3)]
    betas = [await broker.submit(runs_on="beta", env={"LABEL": "beta"}) for _ in range(3)]
    results = await broker.collect(3, timeout_s=10)
    assert set(results) == {b.job_id for b in betas}
    # The alpha jobs this host cannot start stay in the queue for other hosts.
    await wait_for(lambda: not daemon.scheduler.consuming()["alpha"], what="the full alpha label to stop consuming")
    assert await broker.ready_count("alpha") == 3
    daemon.runner.stop_job(blocker.job_id, StopReason.CANCEL)
    rest = await broker.collect(4, timeout_s=10)
    assert set(rest) == {blocker.job_id} | {w.job_id for w in waiting}
    assert rest[blocker.job_id].status is JobStatus.CANCELLED
    await daemon.stop()


async def test_two_daemons_share_work_and_hold_only_what_they_run(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    daemons = [
        await start_daemon(prefix, tmp_path, noop_map_path, f"h{i}", CountingNoop(), max_concurrency=1)
        for i in range(2)
    ]
    await broker.open()
    jobs = [
        await broker.submit(runs_on="alpha", env={"LABEL": "alpha", "NOOP_FAIL": "hang"}, timeout_s=2) for _ in range(4)
    ]
    await wait_for(lambda: all(d.ledger.running == 1 for d in daemons), what="one job running on each host")
    # Each host runs one; the other two are ready in the queue, held by no one.
    assert await broker.ready_count("alpha") == 2
    results = await broker.collect(4, timeout_s=20)
    assert set(results) == {j.job_id for j in jobs}
    assert Counter(r.host for r in results.values()) == {"h0": 2, "h1": 2}
    for daemon in daemons:
        await daemon.stop()


async def _events(amqp, prefix: str) -> tuple[aio_pika.abc.AbstractChannel, asyncio.Queue]:
    channel = await amqp.channel()
    events = await channel.declare_exchange(f"{prefix}.events", aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(events, routing_key="job.started.*")
    started: asyncio.Queue = asyncio.Queue()

    async def on_event(message):
        await message.ack()
        await started.put(message.body)

    await queue.consume(on_event)
    return channel, started


async def test_sigterm_drains_running_jobs_and_loses_no_message(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker, amqp
):
    # The daemon declares the topology; create it first so events can be bound.
    first = await start_daemon(prefix, tmp_path, noop_map_path, "setup", NoopHypervisor(), max_concurrency=1)
    await first.stop()
    channel, started = await _events(amqp, prefix)
    env = {
        **os.environ,
        "AMQP_URL": AMQP_URL,
        "AMQP_PREFIX": prefix,
        "ORCH_CONFIG": str(noop_map_path),
        "STATE_DIR": str(tmp_path / "sub"),
        "ORCH_BACKEND": "noop",
        "MAX_CONCURRENCY": "2",
        "HOST_NAME": "sub",
        "DRAIN_TIMEOUT_S": "20",
        "HTTP_LISTEN": "off",
        "HOST_CPUS": "8",
        "HOST_MEMORY_MB": "8192",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        stderr=asyncio.subprocess.PIPE,
    )
    await broker.open()
    jobs = [await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "1"}) for _ in range(6)]
    for _ in range(2):
        await asyncio.wait_for(started.get(), timeout=20)
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b'"daemon.stopped"' in stderr
    drained = await broker.collect(2, timeout_s=5)
    assert all(r.status is JobStatus.SUCCEEDED and r.host == "sub" for r in drained.values())
    assert await broker.ready_count("alpha") == 4
    successor = await start_daemon(prefix, tmp_path, noop_map_path, "next", NoopHypervisor(), max_concurrency=4)
    rest = await broker.collect(4, timeout_s=20)
    assert set(drained) | set(rest) == {j.job_id for j in jobs}
    assert {r.host for r in rest.values()} == {"next"}
    await successor.stop()
    await channel.close()


async def test_drain_timeout_hands_unfinished_job_back_as_next_attempt(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    daemon = await start_daemon(prefix, tmp_path, noop_map_path, "old", NoopHypervisor(), drain_timeout_s=0.2)
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "2"})
    await wait_for(lambda: daemon.ledger.running == 1, what="the job to be running")
    await daemon.stop()
    assert await daemon.router.list_ours() == []
    successor = await start_daemon(prefix, tmp_path, noop_map_path, "new", NoopHypervisor())
    result = await broker.next_result(timeout_s=20)
    assert result.request_id == job.request_id
    assert result.status is JobStatus.SUCCEEDED and result.host == "new" and result.attempt == 2
    assert broker.results.empty()
    await successor.stop()


async def test_job_given_up_after_its_last_attempt_counts_time_from_its_acceptance(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    daemon = await start_daemon(
        prefix, tmp_path, noop_map_path, "old", NoopHypervisor(), drain_timeout_s=0.5, max_attempts=1
    )
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "30"})
    await wait_for(lambda: daemon.ledger.running == 1, what="the job to start")
    await daemon.stop()  # drains for 0.5 s, then gives the job up: attempt 1 of 1
    result = await broker.next_result()
    assert result.request_id == job.request_id and result.status is JobStatus.ERROR
    assert result.summary == "gave up after attempt 1 of 1: host shutting down"
    assert result.timings["total_s"] >= 0.5, result.timings


async def test_saturated_label_takes_exactly_what_it_can_start_without_requeues(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    # Requeues count toward a quorum queue's delivery limit: under a steady backlog a
    # host must not bounce work it was handed.
    await broker.open()
    setup = await start_daemon(prefix, tmp_path, noop_map_path, "setup", NoopHypervisor(), max_concurrency=1)
    await setup.stop()
    jobs = [await broker.submit(runs_on="alpha") for _ in range(150)]
    backend = NoopHypervisor()
    daemon = await start_daemon(prefix, tmp_path, noop_map_path, "h", backend, max_concurrency=4)
    results = await broker.collect(150, timeout_s=60)
    assert set(results) == {j.job_id for j in jobs}
    assert daemon.scheduler.requeued() == 0
    assert backend.peak_alive <= 4
    await daemon.stop()


async def test_label_with_room_left_keeps_taking_jobs_after_it_paused_itself(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    # With prefetch 2 and one job taken, the consumer pauses before the ack (one more
    # delivery might not fit); it must then resume at once, not when a job ends.
    daemon = await start_daemon(prefix, tmp_path, noop_map_path, "h", NoopHypervisor(), max_concurrency=2)
    await broker.open()
    first = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang"}, timeout_s=30)
    await wait_for(lambda: daemon.ledger.running == 1, what="the first job to be running")
    second = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang"}, timeout_s=30)
    await wait_for(
        lambda: daemon.ledger.running == 2, timeout_s=10, what="the second job to start while the label has room"
    )
    for job in (first, second):
        daemon.runner.stop_job(job.job_id, StopReason.CANCEL)
    await broker.collect(2)
    await daemon.stop()
