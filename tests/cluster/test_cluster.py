"""The fleet on a three-node RabbitMQ cluster (scripts/rabbitmq-cluster.sh, beside the
broker on 5672): a broker node lost under a daemon, a label queue's leader lost, a
rolling restart of every node during a soak with daemons SIGKILLed, the CLI and the
forge bridge publishing while a node is down, and twenty hosts sharing work by capacity.

Every test asserts exactly one result per job (a copy with the same message_id and
body counts once), nothing left ready or unacked in the cluster, and no job left live
in any host's journal (the noop backend's VMs die with their daemon, so a live job
there is a leaked VM). Faults are driven by progress (results in, jobs started), never
by the clock. Daemons are child processes on the noop backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import sqlite3
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest

from orchestrator.core.amqp import connect
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobRequest, JobResult, JobStatus
from orchestrator.core.topology import Topology, declare_topology
from tests.conftest import Broker, wait_for
from tests.host.test_reliability import daemon_env
from tests.support.daemonproc import ROOT, DaemonProcess
from tests.support.rabbitcluster import RabbitCluster, run_script
from tests.web.test_httpapi import free_port

pytestmark = pytest.mark.cluster

QUEUED_STATES = ("accepted", "running")


# Module-scoped: the three nodes are gone before the rest of the suite runs, which
# would otherwise share two cores with their Erlang schedulers.
@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    began = time.monotonic()
    run_script("up")
    print(f"\ncluster up in {time.monotonic() - began:.1f} s")
    cluster = RabbitCluster(running={1, 2, 3})
    yield cluster
    print(f"\nstart-node took {cluster.start_times} s")
    run_script("down")


@pytest.fixture
async def cluster(rabbit_cluster: RabbitCluster) -> RabbitCluster:
    """The cluster with all three nodes running (a failed test may have left one down)."""
    for node in (1, 2, 3):
        if node not in rabbit_cluster.running:
            await rabbit_cluster.start_node(node)
    return rabbit_cluster


class ClusterBroker(Broker):
    """The test's client on the cluster: a failover connection, and a submit that waits
    out a node switch (a publish the lost node did not confirm is published again).

    A request re-published after a lost confirm, or redelivered to another host because
    its ack went down with a node, can run twice: two results with the same message_id
    (`<job>/<attempt>`), of which a consumer keeps the first, as it keeps the first of
    any copy. Those are counted in `reruns`; two results that disagree on the outcome
    (status, exit code) are still a conflict."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reruns: list[str] = []

    def different_copy(self, job_id: str, first: tuple[str | None, bytes], message_id: str | None, body: bytes) -> bool:
        earlier, later = JobResult.model_validate_json(first[1]), JobResult.model_validate_json(body)
        if first[0] == message_id and (earlier.status, earlier.exit_code) == (later.status, later.exit_code):
            self.reruns.append(f"{job_id} on {earlier.host} and {later.host}")
            return False
        return True

    async def submit(self, routing_key: str | None = None, **fields: Any) -> JobRequest:
        fields.setdefault("request_id", str(uuid.uuid4()))
        for _ in range(100):
            try:
                return await super().submit(routing_key, **fields)
            except (aio_pika.exceptions.AMQPError, ConnectionError, RuntimeError, TimeoutError):
                await asyncio.wait_for(self.connection.connected.wait(), 60)
                assert self.channel is not None
                await asyncio.wait_for(self.channel.ready(), 60)  # restored just after the connection
        raise AssertionError("could not publish a job for 100 attempts")


@pytest.fixture
async def cluster_broker(cluster: RabbitCluster, prefix: str) -> AsyncIterator[ClusterBroker]:
    connection = await connect(cluster.urls(3, 2, 1), name="test-client")
    client = ClusterBroker(connection, prefix)
    await client.open()
    yield client
    await connection.close()


def host_env(
    cluster: RabbitCluster, prefix: str, tmp_path: Path, config: Path, host: str, order: tuple[int, ...], **extra: str
) -> dict[str, str]:
    return daemon_env(
        prefix,
        tmp_path / host,
        config,
        ORCH_BACKEND="noop",
        HOST_NAME=host,
        AMQP_URL=cluster.urls(*order),
        MAX_ATTEMPTS="20",
        **extra,
    )


def connected_node(daemon: DaemonProcess) -> int:
    return RabbitCluster.node_number(daemon.events("broker.connected")[-1]["node"])


def live_jobs(state_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(state_dir / "state.db") as db:
        return db.execute(
            f"SELECT job_id, state FROM jobs WHERE state IN ({','.join('?' * len(QUEUED_STATES))})", QUEUED_STATES
        ).fetchall()


async def assert_clean_end(
    cluster: RabbitCluster, prefix: str, daemons: list[DaemonProcess], state_dirs: list[Path]
) -> None:
    """Every daemon stops cleanly, no journal holds a live job, the broker holds nothing."""
    codes = await asyncio.gather(*(d.stop() for d in daemons if d.process and d.process.returncode is None))
    assert all(code == 0 for code in codes), codes
    for state in state_dirs:
        assert live_jobs(state) == [], state
    await cluster.assert_nothing_left(prefix)


def started(daemon: DaemonProcess) -> int:
    return sum('"job.started"' in line for line in daemon.lines)


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            return await response.json()


async def test_the_daemon_fails_over_when_its_node_stops_and_running_jobs_finish(
    cluster, cluster_broker, prefix, tmp_path, noop_map_path
):
    port = free_port()
    env = host_env(
        cluster, prefix, tmp_path, noop_map_path, "h1", (2, 3, 1), MAX_CONCURRENCY="4", HTTP_LISTEN=f"127.0.0.1:{port}"
    )
    daemon = await DaemonProcess(env).start()
    ready = await get_json(f"http://127.0.0.1:{port}/readyz")
    assert ready["ready"] and ready["broker_node"] == "127.0.0.1:5682"
    jobs = [await cluster_broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "1.5"}) for _ in range(8)]
    # Jobs running and queued when the leader goes. (Not "exactly 4 started": once the
    # first deliveries came in two batches, 3 then 4 half a second after the first 3
    # ended, and the count went from 3 to 7 between two looks.)
    await wait_for(lambda: started(daemon) >= 4, what="4 jobs running, the rest queued", timeout_s=30)

    await cluster.stop_node(2)
    results = await cluster_broker.collect(8, timeout_s=60)
    assert set(results) == {j.job_id for j in jobs}
    # The running jobs finished where they were (no second attempt), the queued ones ran after.
    assert all(r.status is JobStatus.SUCCEEDED and r.attempt == 1 for r in results.values())
    assert connected_node(daemon) in (1, 3)
    assert any(e["node"] == "127.0.0.1:5682" for e in daemon.events("broker.connection_lost"))
    status = await get_json(f"http://127.0.0.1:{port}/status")  # the heartbeat, as /status shows it
    ready = await get_json(f"http://127.0.0.1:{port}/readyz")
    assert status["broker_node"] == ready["broker_node"] == f"127.0.0.1:{5680 + connected_node(daemon)}"
    assert "secret" not in "".join(daemon.lines) and "guest:guest" not in "".join(daemon.lines)
    await assert_clean_end(cluster, prefix, [daemon], [tmp_path / "h1"])
    assert not cluster_broker.conflicts


async def test_losing_a_label_queues_leader_elects_another_and_consumers_resume(
    cluster, cluster_broker, prefix, tmp_path, noop_map_path
):
    # Declared from node 1, so node 1 leads the label queues; the daemon is on node 2.
    connection = await aio_pika.connect(cluster.url(1))
    await declare_topology(
        connection,
        Topology(prefix),
        load_image_map(noop_map_path),
        delivery_limit=50,
        dlq_max_length=100_000,
        quorum_size=3,
    )
    await connection.close()
    queue = Topology(prefix).label_queue("alpha")
    assert await cluster.leader_of(queue) == 1
    daemon = await DaemonProcess(
        host_env(cluster, prefix, tmp_path, noop_map_path, "h1", (2, 3, 1), MAX_CONCURRENCY="4")
    ).start()
    assert connected_node(daemon) == 2
    jobs = [await cluster_broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "1"}) for _ in range(8)]
    # Jobs running and queued when the leader goes. (Not "exactly 4 started": once the
    # first deliveries came in two batches, 3 then 4 half a second after the first 3
    # ended, and the count went from 3 to 7 between two looks.)
    await wait_for(lambda: started(daemon) >= 4, what="4 jobs running, the rest queued", timeout_s=30)

    await cluster.stop_node(1)
    assert await cluster.leader_of(queue) in (2, 3)
    results = await cluster_broker.collect(8, timeout_s=60)
    more = [await cluster_broker.submit(runs_on="alpha") for _ in range(4)]  # intake after the election
    results.update(await cluster_broker.collect(4, timeout_s=30))
    assert set(results) == {j.job_id for j in jobs + more}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert connected_node(daemon) == 2  # its node stayed up: no reconnection needed
    await assert_clean_end(cluster, prefix, [daemon], [tmp_path / "h1"])
    assert not cluster_broker.conflicts


async def test_enqueue_and_the_forge_bridge_publish_while_a_node_is_down(
    cluster, cluster_broker, prefix, tmp_path, noop_map_path
):
    from tests.forge.test_forge_end_to_end import github_push
    from tests.support.fakeforge import FakeForge
    from tests.support.fakeforge import github as fake_github
    from tests.support.forgebridge import JOBS, start_bridge, write_config

    await cluster.stop_node(1)  # the first node of every AMQP_URL below
    urls = cluster.urls(1, 2, 3)
    daemon = await DaemonProcess(
        host_env(cluster, prefix, tmp_path, noop_map_path, "h1", (1, 2, 3), MAX_CONCURRENCY="4")
    ).start()
    assert connected_node(daemon) == 2 and daemon.events("broker.node_unavailable")[0]["node"] == "127.0.0.1:5681"

    enqueue = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "enqueue",
        "--repo",
        "https://example.invalid/r.git",
        "--commit",
        "a" * 40,
        "--runs-on",
        "alpha",
        "--config",
        str(noop_map_path),
        "--wait",
        "--wait-timeout",
        "60",
        env={**os.environ, "AMQP_URL": urls, "AMQP_PREFIX": prefix},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(enqueue.communicate(), 90)
    assert enqueue.returncode == 0, err.decode()
    assert ": succeeded (exit code 0)" in out.decode()

    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo="octo-org/widgets")
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github", amqp_url=urls)
    try:
        assert bridge.bridge.broker_connected
        ready = await get_json(f"{bridge.url}/readyz")
        assert ready["ready"] and RabbitCluster.node_number(ready["broker_node"]) == 2, ready
        sha = hashlib.sha1(b"while node 1 is down").hexdigest()
        fake.files[("octo-org/widgets", sha, ".orchestrator.yaml")] = JOBS.encode()
        assert (await bridge.deliver(*github_push(sha)))[0] == 202
        states = await fake.wait_for_state(sha, "orchestrator/test", "success", timeout_s=60)
        assert states[-1] == "success"
    finally:
        await bridge.bridge.stop()
        await fake.close()
    # The test's own client read both results from the durable results queue.
    results = await cluster_broker.collect(2, timeout_s=30)
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    await assert_clean_end(cluster, prefix, [daemon], [tmp_path / "h1"])
    # The bridge's status queue was read to the end too (its consumer acked each message).
    assert not cluster_broker.conflicts


SOAK_JOBS = 1000
SOAK_HOSTS = 6


async def test_a_rolling_restart_of_every_node_during_a_soak_with_daemon_kills_loses_nothing(
    cluster, cluster_broker, prefix, tmp_path, noop_map_path
):
    rng = random.Random(12)
    envs = [
        host_env(
            cluster,
            prefix,
            tmp_path,
            noop_map_path,
            f"s{i}",
            (i % 3 + 1, (i + 1) % 3 + 1, (i + 2) % 3 + 1),
            MAX_CONCURRENCY="6",
        )
        for i in range(SOAK_HOSTS)
    ]
    daemons = list(await asyncio.gather(*(DaemonProcess(env).start() for env in envs)))
    every_daemon = list(daemons)
    results: dict[str, Any] = {}
    jobs: list[JobRequest] = []
    publishing = asyncio.Event()
    publishing.set()
    publish_lock = asyncio.Lock()
    kills = 0
    restarted: list[int] = []

    async def publish() -> None:
        for n in range(SOAK_JOBS):
            await publishing.wait()
            async with publish_lock:
                label = rng.choice(["alpha", "beta"])
                jobs.append(
                    await cluster_broker.submit(runs_on=label, env={"NOOP_DURATION_S": f"{rng.uniform(0, 0.05):.3f}"})
                )
            if n % 25 == 24:
                await asyncio.sleep(0)  # let results and faults in between bursts

    async def faults() -> None:
        nonlocal kills
        # A fault once each sixth of the jobs is in: node restarts and SIGKILLs in turn.
        steps = ["node1", "kill", "node2", "kill", "node3", "kill"]
        for step_index, step in enumerate(steps):
            await wait_for(
                lambda step_index=step_index: len(results) >= (step_index + 1) * SOAK_JOBS // (len(steps) + 1),
                what=f"results before fault {step}",
                timeout_s=120,
                interval_s=0.05,
            )
            if step == "kill":
                victim = rng.randrange(SOAK_HOSTS)
                await daemons[victim].kill()
                kills += 1
                daemons[victim] = await DaemonProcess(envs[victim]).start()
                every_daemon.append(daemons[victim])
            else:
                node = int(step[-1])
                # No publish of the test's own is in flight while its node may go: a
                # confirm lost with the node would make the test publish a job twice.
                publishing.clear()
                async with publish_lock:
                    await cluster.stop_node(node)
                publishing.set()
                await cluster.start_node(node)
                restarted.append(node)

    async def collect_all() -> None:
        while len(results) < SOAK_JOBS:
            results.update(await cluster_broker.collect(1, timeout_s=120))

    tasks = [asyncio.create_task(publish()), asyncio.create_task(faults()), asyncio.create_task(collect_all())]
    try:
        done, pending = await asyncio.wait(tasks, timeout=240, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
        assert not pending, (
            f"waited 240 s: {len(results)} of {SOAK_JOBS} results, {len(restarted)} node restarts, {kills} kills"
        )
    except AssertionError:
        missing = sorted({j.job_id for j in jobs} - set(results))[:3]
        logs = tmp_path / "daemon-logs"
        logs.mkdir()
        for n, daemon in enumerate(every_daemon):
            (logs / f"{n:02d}-{daemon.env['HOST_NAME']}.log").write_text("".join(daemon.lines))
        raise AssertionError(
            f"{len(missing)} jobs without a result (every host's log: {logs}); what the hosts said of them: "
            + " | ".join(f"{job_id}: {said_of(every_daemon, job_id)}" for job_id in missing)
        ) from None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert set(results) == {j.job_id for j in jobs} and len(jobs) == SOAK_JOBS
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert not cluster_broker.conflicts
    assert restarted == [1, 2, 3] and kills == 3
    hosts_used = Counter(r.host for r in results.values())
    assert len(hosts_used) == SOAK_HOSTS, hosts_used
    await assert_clean_end(cluster, prefix, daemons, [tmp_path / f"s{i}" for i in range(SOAK_HOSTS)])
    switched = sum(len(d.events("broker.connection_lost")) for d in every_daemon)
    left_to_another = sum(len(d.events("job.held_elsewhere")) + len(d.events("job.superseded")) for d in every_daemon)
    print(
        f"soak on the cluster: {SOAK_JOBS} jobs on {SOAK_HOSTS} hosts, nodes restarted {restarted}, {kills} SIGKILLs, "
        f"{switched} node switches by daemons, {cluster_broker.redeliveries} result copies dropped, "
        f"{sum(r.attempt > 1 for r in results.values())} jobs re-run, {len(cluster_broker.reruns)} run twice: {cluster_broker.reruns[:3]}, "
        f"{left_to_another} deliveries left to the host that had them"
    )


def said_of(daemons: list[DaemonProcess], job_id: str) -> list[str]:
    """Each host's log lines about a job, shortened: what a failure message shows."""
    return [f"{d.env['HOST_NAME']}: {line.strip()[:300]}" for d in daemons for line in d.lines if job_id in line]


FLEET_HOSTS = 20
FLEET_JOBS = 400


def peak_held(daemon: DaemonProcess) -> int:
    """The most jobs this daemon process held at once, from its log: accepted (journaled
    and acked, its capacity reserved) and not yet finished."""
    held = peak = 0
    for line in daemon.lines:
        if '"job.accepted"' in line:
            held += 1
            peak = max(peak, held)
        elif '"job.finished"' in line:
            held -= 1
    return peak


async def test_twenty_hosts_share_work_by_capacity_and_a_killed_host_loses_nothing(
    cluster, cluster_broker, prefix, tmp_path, noop_map_path
):
    # Capacities 1-3 and labels differ by host; each host's label limits add up to its
    # MAX_CONCURRENCY, so that shares per label slot can be compared (tests/host/test_backlog.py
    # has limits that overlap: each host's window holds them all the same).
    label_limits = [{"alpha": 1, "beta": 0}, {"alpha": 1, "beta": 1}, {"alpha": 2, "beta": 1}, {"alpha": 0, "beta": 1}]
    limits = {f"f{i:02d}": label_limits[i % 4] for i in range(FLEET_HOSTS)}
    capacity = {host: sum(by_label.values()) for host, by_label in limits.items()}
    envs = {
        host: host_env(
            cluster,
            prefix,
            tmp_path,
            noop_map_path,
            host,
            ((i % 3) + 1,),
            MAX_CONCURRENCY=str(capacity[host]),
            CAPACITY_MAP=",".join(f"{label}={n}" for label, n in limits[host].items()),
        )
        for i, host in enumerate(limits)
    }
    daemons = dict(zip(envs, await asyncio.gather(*(DaemonProcess(env).start() for env in envs.values())), strict=True))
    every_daemon = list(daemons.values())
    jobs = [
        await cluster_broker.submit(runs_on="alpha" if n % 3 else "beta", env={"NOOP_DURATION_S": "0.4"})
        for n in range(FLEET_JOBS)
    ]
    victim = "f02"  # alpha 2, beta 1
    await wait_for(lambda: started(daemons[victim]) >= 2, what=f"{victim} to run jobs", timeout_s=60)
    await daemons[victim].kill()
    daemons[victim] = await DaemonProcess(envs[victim]).start()  # its journal: re-publish what it held
    every_daemon.append(daemons[victim])
    results = await cluster_broker.collect(FLEET_JOBS, timeout_s=120)
    assert set(results) == {j.job_id for j in jobs}
    assert all(r.status is JobStatus.SUCCEEDED for r in results.values())
    assert not cluster_broker.conflicts
    # No host ever held a job it could not start: never more jobs at once than its
    # capacity, and nothing handed back to the broker for want of room.
    requeued = Counter()
    for daemon in every_daemon:
        host = daemon.env["HOST_NAME"]
        assert peak_held(daemon) <= capacity[host], (host, peak_held(daemon), capacity[host])
        requeued[host] += len(daemon.events("delivery.requeued"))
    assert sum(requeued.values()) == 0, requeued
    # Each host's share follows its capacity: alpha jobs per alpha slot alike on hosts
    # with one alpha slot and with two (the killed host aside).
    label_of = {j.job_id: j.runs_on for j in jobs}
    alpha_done = Counter(r.host for k, r in results.items() if label_of[k] == "alpha")
    per_slot = {
        slots: sum(alpha_done[h] for h in limits if limits[h]["alpha"] == slots and h != victim)
        / sum(slots for h in limits if limits[h]["alpha"] == slots and h != victim)
        for slots in (1, 2)
    }
    assert 0.5 < per_slot[2] / per_slot[1] < 2.0, (per_slot, alpha_done)
    done = Counter(r.host for r in results.values())
    assert set(done) == set(limits), done
    await assert_clean_end(cluster, prefix, list(daemons.values()), [tmp_path / h for h in limits])
    print(f"fleet of {FLEET_HOSTS}: alpha jobs per alpha slot {per_slot}; jobs by host {dict(sorted(done.items()))}")
