"""Nothing grows without bound: journal rows and console logs of jobs that ended more
than RETENTION_DAYS ago are deleted (never a running job, never an unconfirmed result),
the dead-letter queue keeps at most DLQ_MAX_LENGTH messages, and /metrics shows the
state directory's size and the DLQ's depth."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import aio_pika
import aiohttp

from orchestrator.core.messages import JobRequest, JobResult, JobStatus
from orchestrator.host.journal import JobState
from orchestrator.host.retention import DAY_S, sweep
from orchestrator.host.runner import StopReason
from tests.conftest import SHA, wait_for
from tests.web.test_httpapi import free_port


async def test_old_jobs_are_forgotten_but_running_and_unconfirmed_ones_are_kept(daemon_factory, broker):
    daemon = await daemon_factory()
    await broker.open()
    done = [await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "old output"}) for _ in range(3)]
    await broker.collect(3)
    await wait_for(lambda: daemon.outbox.published == 3, what="the broker's confirms")
    running = await broker.submit(runs_on="beta", env={"NOOP_FAIL": "hang", "NOOP_OUTPUT": "still going"}, timeout_s=60)
    await wait_for(lambda: daemon.job_running(running.job_id), what="the long job to start")
    unconfirmed = JobRequest(request_id=uuid.uuid4(), repo_url="https://x/y", commit_sha=SHA)
    answer = JobResult.for_request(unconfirmed, status=JobStatus.ERROR, summary="not yet confirmed")
    assert await daemon.journal.record_answer(unconfirmed, answer, label="alpha")  # finished, never published
    daemon.console_path(unconfirmed.job_id).write_text("kept until the broker has its result\n")
    stranger = daemon.console_path(str(uuid.uuid4()))
    stranger.write_text("a log no journal row knows\n")
    os.utime(stranger, (time.time() - 20 * DAY_S,) * 2)

    swept = await sweep(
        daemon.journal,
        daemon.settings.state,
        retention_days=14,
        running=set(daemon.runner.running),
        now=time.time() + 15 * DAY_S,
    )
    assert swept.jobs == 3 and swept.logs >= 4
    for job in done:
        assert await daemon.journal.get(job.job_id) is None
        assert not daemon.console_path(job.job_id).exists()
    assert (await daemon.journal.get(running.job_id)).state is JobState.RUNNING
    assert daemon.console_path(running.job_id).exists()
    assert (await daemon.journal.get(unconfirmed.job_id)).state is JobState.FINISHED
    assert daemon.console_path(unconfirmed.job_id).exists()
    assert not stranger.exists()
    assert daemon.runner.stop_job(running.job_id, StopReason.CANCEL)


async def test_old_logs_are_swept_at_start_and_metrics_show_sizes(daemon_factory, tmp_path):
    old = tmp_path / "host0" / "logs" / f"{uuid.uuid4()}.console"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"x" * 100_000)
    os.utime(old, (time.time() - 30 * DAY_S,) * 2)
    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await wait_for(lambda: not old.exists(), what="the start-up sweep to delete a 30-day-old log")
    async with aiohttp.ClientSession() as http:

        async def metrics() -> str:
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                return await response.text()

        text = ""
        async with asyncio.timeout(20):
            while "orchestrator_dlq_messages" not in text:
                text = await metrics()
    assert "orchestrator_state_dir_bytes " in text and "orchestrator_dlq_messages 0.0" in text


async def test_the_dead_letter_queue_keeps_only_the_newest(daemon_factory, broker):
    await daemon_factory(dlq_max_length=3)
    await broker.open()
    dlx = await broker.channel.get_exchange(broker.topology.dlx, ensure=False)
    for n in range(5):  # confirmed one by one: the broker has them all when this ends
        await dlx.publish(aio_pika.Message(f"dead letter {n}".encode()), routing_key="alpha")
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(broker.topology.dlq, passive=True)
    await channel.close()
    assert queue.declaration_result.message_count == 3
    letters = await broker.dead_letters(3)
    assert [m.body for m in letters] == [b"dead letter 2", b"dead letter 3", b"dead letter 4"]


async def test_an_unbounded_dlq_from_before_is_used_and_the_log_says_how_to_bound_it(
    daemon_factory, broker, amqp, caplog
):
    channel = await amqp.channel()
    await channel.declare_queue(broker.topology.dlq, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.close()
    await daemon_factory()
    warning = next(r for r in caplog.records if r.getMessage() == "dlq.bound_not_applied")
    assert "rabbitmqctl set_policy" in warning.fields["fix"]
    await broker.open()
    job = await broker.submit(runs_on="alpha")
    assert (await broker.next_result()).request_id == job.request_id
