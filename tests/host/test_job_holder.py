"""A job delivered twice runs once across the fleet: a redelivered request another host
has is acked without running, and a host handing a job back leaves it to a host that
already ran its redelivery (`holder`, orchestrator/host/handback.py).

The redeliveries are the broker's own: a consumer takes the request without acking and
its channel closes, so the broker marks it redelivered, as it does when a host is killed
before its ack or its ack goes down with a broker node. A restarted host's journal is
left as a host killed between its journal write and its ack leaves it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable

import aio_pika

from hypervisors.noop import NoopHypervisor
from hypervisors.statedir import vm_name_for
from orchestrator.core.messages import JobRequest, JobStatus
from orchestrator.host.journal import JobState, Journal
from tests.conftest import SHA, Broker, make_settings, wait_for
from tests.host.test_reload import consumers_on
from tests.support.amqpproxy import BASIC_ACK


async def take_without_ack(broker: Broker, label: str, count: int) -> list[str]:
    """Take `count` requests from the label's queue and close the channel unacked: the
    broker requeues them marked redelivered. Their job ids."""
    channel = await broker.connection.channel()
    await channel.set_qos(prefetch_count=count)
    queue = await channel.get_queue(broker.topology.label_queue(label), ensure=False)
    taken: list[str] = []
    got_all = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        taken.append(str(JobRequest.model_validate_json(message.body).request_id))
        if len(taken) == count:
            got_all.set()

    await queue.consume(on_message)
    await asyncio.wait_for(got_all.wait(), 20)
    await channel.close()
    return taken


async def test_a_redelivered_request_another_host_has_is_acked_and_one_nobody_has_runs(daemon_factory, broker, amqp):
    first = await daemon_factory(host_name="a")
    await broker.open()
    job = await broker.submit(runs_on="alpha", script="make")
    result = await broker.next_result()
    assert result.request_id == job.request_id and result.host == "a"
    await first.set_draining(True)
    queue_name = broker.topology.label_queue("alpha")
    await wait_for(lambda: _is(consumers_on(amqp, queue_name), 0), what="host a's alpha consumer to stop")

    await broker.submit(**job.model_dump(mode="json"))  # the same request again (its first ack lost)
    fresh = await broker.submit(runs_on="alpha", script="make")
    assert sorted(await take_without_ack(broker, "alpha", 2)) == sorted([job.job_id, fresh.job_id])

    second = await daemon_factory(host_name="b")
    result = await broker.next_result()
    assert result.request_id == fresh.request_id and result.host == "b"
    await wait_for(lambda: _is(broker.ready_count("alpha"), 0), what="the alpha queue to be empty")
    assert await second.journal.get(job.job_id) is None  # left to host a, never journaled here
    assert sum(second.runner.finished.values()) == 1
    assert sum(first.runner.finished.values()) == 1
    assert not broker.conflicts and broker.redeliveries == 0


def journaled_before_a_kill(state_db, label: str, *requests: JobRequest) -> None:
    """What a host killed between its journal write and its ack leaves: the jobs accepted."""

    async def write() -> None:
        journal = Journal(state_db)
        for request in requests:
            await journal.accept(
                request,
                label=label,
                nonce=uuid.uuid4().hex,
                vm_name=vm_name_for(request.job_id),
                backend="noop",
                accepted_at=time.time(),
            )
        await journal.close()

    return write()


async def test_a_restarted_host_leaves_a_job_to_the_host_that_ran_its_redelivery_and_hands_back_the_rest(
    daemon_factory, broker, prefix, tmp_path, noop_map_path
):
    other = await daemon_factory(host_name="b")
    await broker.open()
    ran_elsewhere = await broker.submit(runs_on="alpha", script="make")
    result = await broker.next_result()
    assert result.request_id == ran_elsewhere.request_id and result.host == "b" and result.attempt == 1
    nowhere = JobRequest.model_validate(
        {
            "request_id": str(uuid.uuid4()),
            "repo_url": "https://example.invalid/repo.git",
            "commit_sha": SHA,
            "runs_on": "alpha",
            "script": "make",
        }
    )
    settings = make_settings(prefix, tmp_path / "a", noop_map_path, host_name="a")
    settings.state.create()
    await journaled_before_a_kill(settings.state.journal, "alpha", ran_elsewhere, nowhere)

    restarted = await daemon_factory(host_name="a")
    handed_back = await broker.next_result()
    assert handed_back.request_id == nowhere.request_id and handed_back.attempt == 2
    try:
        await wait_for(
            lambda: _is(_state(restarted, ran_elsewhere.job_id), JobState.SUPERSEDED),
            what="the job host b ran to be superseded on host a",
        )
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: host a has it {await _state(restarted, ran_elsewhere.job_id)}, "
            f"hosts a knows: {[h.host for h in restarted.fleet.hosts()]}, results: {broker.conflicts}"
        ) from None
    await wait_for(lambda: _is(broker.ready_count("alpha"), 0), what="the alpha queue to be empty")
    assert (
        sum(other.runner.finished.values()) + sum(restarted.runner.finished.values()) == 2
    )  # each job ran once more at most
    assert handed_back.status is JobStatus.SUCCEEDED
    assert not broker.conflicts and broker.redeliveries == 0


async def _is(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def _state(daemon, job_id: str) -> JobState | None:
    record = await daemon.journal.get(job_id)
    return record.state if record is not None else None


async def test_a_host_whose_ack_was_lost_stops_its_copy_once_back_when_another_host_runs_the_redelivery(
    daemon_factory, broker, amqp_proxy
):
    ack_lost = amqp_proxy.cut_at(BASIC_ACK)  # after host a's journal commit, before the broker has its ack
    first_vms = NoopHypervisor()
    first = await daemon_factory(host_name="a", amqp_url=amqp_proxy.url, backend=first_vms)
    await broker.open()
    job = await broker.submit(runs_on="alpha", script="make", env={"NOOP_DURATION_S": "10"})
    await asyncio.wait_for(ack_lost.wait(), 20)
    amqp_proxy.down()  # host a stays away: it cannot answer the question about its job
    await wait_for(lambda: first_vms.alive == 1, what="host a to run the job it journaled")

    second_vms = NoopHypervisor()
    await daemon_factory(host_name="b", backend=second_vms)  # the broker redelivers the job to it
    await wait_for(lambda: second_vms.alive == 1, what="host b to run the redelivery", timeout_s=30)
    amqp_proxy.up()
    await wait_for(
        lambda: _is(_state(first, job.job_id), JobState.SUPERSEDED),
        what="host a to leave the job to host b",
        timeout_s=30,
    )
    assert first_vms.alive == 0 and second_vms.alive == 1  # host a's copy stopped, host b's runs on
    result = await broker.next_result(timeout_s=30)
    assert result.request_id == job.request_id and result.host == "b" and result.status is JobStatus.SUCCEEDED
    assert not broker.conflicts and broker.redeliveries == 0
