"""A request_id this host already has: a copy is acked, a reused id is dead-lettered, and
neither is requeued (each requeue counts toward the delivery limit and delays others)."""

from __future__ import annotations

import time
import uuid

from hypervisors.statedir import vm_name_for
from orchestrator.core.messages import JobRequest, JobStatus
from orchestrator.core.topology import REASON_HEADER
from orchestrator.host.journal import JobState
from tests.conftest import SHA, Broker, wait_for


async def _dlq_ready(broker: Broker) -> int:
    channel = await broker.connection.channel()
    queue = await channel.declare_queue(broker.topology.dlq, passive=True)
    count = queue.declaration_result.message_count
    await channel.close()
    return count


async def _assert_nothing_requeued_or_left(daemon, broker: Broker) -> None:
    assert await broker.ready_count("alpha") == 0
    assert await _dlq_ready(broker) == 0
    assert daemon.scheduler.requeued() == 0


async def test_copies_of_a_running_job_are_acked_a_reused_id_dead_lettered_and_others_not_delayed(
    daemon_factory, broker
):
    daemon = await daemon_factory()
    await broker.open()
    job_id = str(uuid.uuid4())
    long_job = {"runs_on": "alpha", "request_id": job_id, "script": "make", "env": {"NOOP_DURATION_S": "2"}}
    await broker.submit(**long_job)
    await wait_for(lambda: job_id in daemon.runner.running, what="the long job to run")
    others = []
    for _ in range(3):  # each copy has its own submitted_at (publisher left it out): still a copy
        await broker.submit(**long_job)
        others.append(await broker.submit(runs_on="alpha"))
    await broker.submit(**{**long_job, "script": "make test"})
    others.append(await broker.submit(runs_on="alpha"))

    results = await broker.collect(len(others), timeout_s=20)
    assert set(results) == {other.job_id for other in others}
    assert job_id in daemon.runner.running  # the others' results came while the long job still ran
    (dead,) = await broker.dead_letters(1)
    assert dead.headers[REASON_HEADER] == f"request_id {job_id} reused with a different request"
    assert JobRequest.model_validate_json(dead.body).script == "make test"
    await _assert_nothing_requeued_or_left(daemon, broker)

    result = await broker.next_result()
    assert str(result.request_id) == job_id and result.status is JobStatus.SUCCEEDED
    assert sum(daemon.runner.finished.values()) == len(others) + 1  # the long job ran once
    await _assert_nothing_requeued_or_left(daemon, broker)
    assert not broker.conflicts and broker.redeliveries == 0


async def test_copy_of_a_journaled_job_is_acked_a_reused_id_dead_lettered_and_a_handed_back_job_runs_again(
    daemon_factory, broker
):
    daemon = await daemon_factory()
    await broker.open()
    job = await broker.submit(runs_on="alpha", script="make")
    first = await broker.next_result()
    assert first.request_id == job.request_id and first.status is JobStatus.SUCCEEDED
    await broker.submit(runs_on="alpha", request_id=job.job_id, script="make")
    await broker.submit(runs_on="alpha", request_id=job.job_id, script="make", attempt=2)  # it finished: a copy
    await broker.submit(runs_on="alpha", request_id=job.job_id, script="make", env={"X": "1"})
    (dead,) = await broker.dead_letters(1)
    assert dead.headers[REASON_HEADER] == f"request_id {job.job_id} reused with a different request"

    # Not a copy: the next attempt of a job this host handed back (as one that shut down mid-job leaves it).
    handed_back = JobRequest.model_validate(
        {
            "request_id": str(uuid.uuid4()),
            "repo_url": "https://example.invalid/repo.git",
            "commit_sha": SHA,
            "runs_on": "alpha",
        }
    )
    await daemon.journal.accept(
        handed_back,
        label="alpha",
        nonce="n",
        vm_name=vm_name_for(handed_back.job_id),
        backend="noop",
        accepted_at=time.time(),
    )
    await daemon.journal.move(handed_back.job_id, JobState.REQUEUED)
    await broker.submit(**{**handed_back.model_dump(mode="json"), "attempt": 2})
    result = await broker.next_result()
    assert result.request_id == handed_back.request_id and result.attempt == 2
    assert result.status is JobStatus.SUCCEEDED
    assert sum(daemon.runner.finished.values()) == 2
    await _assert_nothing_requeued_or_left(daemon, broker)
    assert not broker.conflicts and broker.redeliveries == 0
