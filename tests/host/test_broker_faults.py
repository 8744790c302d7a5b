"""Broker faults with jobs running: every connection closed by force, and the broker
application restarted. Jobs keep running, results arrive once the broker is back, and
intake resumes."""

from __future__ import annotations

import asyncio
import subprocess

from hypervisors.noop import NoopHypervisor
from orchestrator.core.messages import JobsQuery, JobStatus
from tests.conftest import wait_for
from tests.support.amqpproxy import BASIC_CANCEL


async def rabbitmqctl(*args: str) -> None:
    await asyncio.to_thread(subprocess.run, ["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=120)


async def _jobs_survive(daemon_factory, broker, fault) -> None:
    backend = NoopHypervisor()
    await daemon_factory(max_concurrency=4, backend=backend)
    await broker.open()
    jobs = [await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "3"}) for _ in range(4)]
    await wait_for(lambda: backend.alive == 4, timeout_s=20, what="4 VMs running")
    await fault()
    results = await broker.collect(4, timeout_s=90)
    assert set(results) == {j.job_id for j in jobs}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    # Intake came back: consumers are live again with a working prefetch.
    after = [await broker.submit(runs_on=label) for label in ("alpha", "beta", "alpha")]
    more = await broker.collect(3, timeout_s=60)
    assert set(more) == {j.job_id for j in after}
    assert not broker.conflicts
    assert backend.peak_alive == 4  # reached, and never exceeded across the reconnection


async def test_close_all_connections_mid_job(daemon_factory, broker):
    await _jobs_survive(daemon_factory, broker, lambda: rabbitmqctl("close_all_connections", "test: forced close"))


async def test_broker_restart_mid_job(daemon_factory, broker):
    async def restart() -> None:
        await rabbitmqctl("stop_app")
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")

    await _jobs_survive(daemon_factory, broker, restart)


async def _get(url: str) -> tuple[int, str]:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.get(url) as response:
            return response.status, await response.text()


async def _until(url: str, status: int, timeout_s: float = 60) -> str:
    async with asyncio.timeout(timeout_s):
        while True:
            code, body = await _get(url)
            if code == status:
                return body
            await asyncio.sleep(0.2)


async def test_readiness_reports_the_broker_state_and_metrics_are_served(daemon_factory, broker):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    assert (await _get(f"{base}/healthz"))[0] == 200
    assert '"broker": "connected"' in await _until(f"{base}/readyz", 200)
    await broker.open()
    await broker.submit(runs_on="alpha")
    await broker.next_result()
    assert await daemon.runner.wait_idle(10)  # the result goes out before the clean-up
    # and the broker's confirm is recorded just after it
    await wait_for(lambda: daemon.outbox.published >= 1, timeout_s=10, what="the result's publish confirm")
    code, metrics = await _get(f"{base}/metrics")
    assert code == 200 and 'orchestrator_jobs_finished_total{status="succeeded"} 1.0' in metrics
    assert "orchestrator_results_published_total 1.0" in metrics
    assert 'orchestrator_jobs_running{label="alpha"} 0.0' in metrics
    code, status = await _get(f"{base}/status")
    assert code == 200 and '"labels": ["alpha", "beta"]' in status and '"images": {}' in status
    await rabbitmqctl("stop_app")
    try:
        body = await _until(f"{base}/readyz", 503)
        assert "broker connection is down" in body
    finally:
        await rabbitmqctl("start_app")
        await rabbitmqctl("await_startup")
    await _until(f"{base}/readyz", 200)


async def test_a_daemon_whose_broker_went_away_stops_without_waiting_on_it(daemon_factory, amqp_proxy, caplog):
    """A stop while the broker is away (systemd stopping a host in an outage) closes
    every step at once: a question to the fleet asked just after a reconnection (the
    describe round) once waited there for a broker that never came back."""
    daemon = await daemon_factory(amqp_url=amqp_proxy.url)
    amqp_proxy.down()
    await wait_for(lambda: not daemon.broker_connected, what="the daemon to see the broker gone")
    reconnected = amqp_proxy.connections + 1
    amqp_proxy.up()
    # Back: the daemon asks every host to describe itself (a question that stays open for
    # its whole answer timeout), and the broker goes again while it is asked.
    await wait_for(lambda: amqp_proxy.connections >= reconnected and daemon.broker_connected, what="the reconnection")
    amqp_proxy.down()
    await daemon.stop()
    timed_out = [
        r for r in caplog.records if r.name == "orchestrator.host.daemon" and r.msg == "daemon.close_timed_out"
    ]
    assert timed_out == [], [r.fields for r in timed_out]


async def test_a_fleet_question_whose_clean_up_the_broker_is_slow_to_confirm_costs_nothing(
    daemon_factory, amqp_proxy, caplog
):
    """A fleet question cancels its reply queue's consumer when it is done, waiting a
    second at most. The broker confirming that cancel late (load, a slow link) must not
    cost the host its channel: a cancel cut short closed it (aiormq's answer to an RPC
    cancelled), and the next question published on it took the whole connection down,
    the acks of the host's jobs with it."""
    daemon = await daemon_factory(amqp_url=amqp_proxy.url)
    # The next cancel the host sends (the describe round's at start, or a question's)
    # reaches the broker 2.5 s late, and everything the host sends after it too.
    cancel_passed = amqp_proxy.hold_at(BASIC_CANCEL, 2.5)
    await asyncio.wait_for(cancel_passed.wait(), 30)
    answer = await daemon.fleet.jobs(JobsQuery())
    assert [reply.host for reply in answer.replies] == [daemon.settings.host_name]
    lost = [r for r in caplog.records if r.name == "orchestrator.core.amqp" and r.msg == "broker.connection_lost"]
    assert lost == [] and amqp_proxy.connections == 1, [r.fields for r in lost]
