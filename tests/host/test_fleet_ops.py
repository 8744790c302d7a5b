"""Operating the fleet with two real daemons on the real broker: drain and resume (CLI and
HTTP), the jobs API and `orchestrator jobs`, `orchestrator logs` (whole and followed)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from hypervisors.base import BackendName
from hypervisors.noop import NoopHypervisor
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobStatus
from orchestrator.host.daemon import Daemon
from tests.conftest import AMQP_URL, make_settings, wait_for
from tests.web.test_httpapi import free_port

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fleet-token"


async def cli(prefix: str, config: Path, *args: str, timeout_s: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        *args,
        "--config",
        str(config),
        env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix, "HTTP_TOKEN": TOKEN},
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    return process.returncode, stdout.decode(), stderr.decode()


def consumers_by_queue(prefix: str) -> dict[str, int]:
    """From the broker itself: consumers on each of this test's queues."""
    out = subprocess.run(
        ["rabbitmqctl", "-q", "list_consumers", "-p", "/", "queue_name"], check=True, capture_output=True, text=True
    ).stdout
    counts: dict[str, int] = {}
    for line in out.splitlines():
        name = line.strip()
        if name.startswith(prefix):
            counts[name] = counts.get(name, 0) + 1
    return counts


async def start_host(prefix, tmp_path, noop_map_path, name: str, **overrides) -> Daemon:
    # A job left running when a test ends is handed back after a second, not after the
    # default drain timeout: the stop is the test's cleanup, not what it measures.
    overrides.setdefault("drain_timeout_s", 1)
    port = free_port()
    settings = make_settings(
        prefix,
        tmp_path / name,
        noop_map_path,
        host_name=name,
        http_listen=f"127.0.0.1:{port}",
        http_token=TOKEN,
        public_url=f"http://127.0.0.1:{port}",
        **overrides,
    )
    daemon = Daemon(settings, load_image_map(noop_map_path), backends={BackendName.NOOP: NoopHypervisor()})
    await daemon.start()
    return daemon


def api(daemon: Daemon) -> str:
    return daemon.settings.public_url


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_a_drained_host_takes_nothing_and_stays_drained_across_a_restart(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    a = await start_host(prefix, tmp_path, noop_map_path, "a")
    b = await start_host(prefix, tmp_path, noop_map_path, "b")
    try:
        alpha = f"{prefix}.jobs.alpha"
        await wait_for(lambda: consumers_by_queue(prefix).get(alpha) == 2, interval_s=0.2, what="both hosts consuming")
        code, out, err = await cli(prefix, noop_map_path, "drain", "--host", "a")
        assert code == 0, err
        assert out.strip() == "a: draining, 0 job(s) running"
        # The broker shows a's consumers gone; b's stay.
        await wait_for(
            lambda: consumers_by_queue(prefix).get(alpha) == 1, interval_s=0.2, what="a's consumers cancelled"
        )
        async with aiohttp.ClientSession(headers=AUTH) as http:
            async with http.get(f"{api(a)}/readyz") as response:
                assert response.status == 503 and "host is draining" in (await response.json())["reasons"]
        assert a.heartbeat().draining and not b.heartbeat().draining
        await broker.open()
        jobs = [await broker.submit(runs_on="alpha") for _ in range(6)]
        results = await broker.collect(6)
        assert {r.host for r in results.values()} == {"b"} and len(results) == len(jobs)
        code, out, _ = await cli(prefix, noop_map_path, "hosts")
        assert "a: draining" in out and "b: serving" in out
        # A restart keeps the host drained (journaled).
        await a.stop()
        a = await start_host(prefix, tmp_path, noop_map_path, "a")
        assert a.ledger.draining
        await asyncio.sleep(0.5)
        assert consumers_by_queue(prefix).get(alpha) == 1
        # Resumed over HTTP, it takes work again.
        async with aiohttp.ClientSession(headers=AUTH) as http:
            async with http.post(f"{api(a)}/resume") as response:
                assert response.status == 200 and await response.json() == {
                    "host": "a",
                    "draining": False,
                    "running": 0,
                }
        await wait_for(lambda: consumers_by_queue(prefix).get(alpha) == 2, interval_s=0.2, what="a consuming again")
        await b.set_draining(True)
        job = await broker.submit(runs_on="alpha")
        assert (await broker.next_result()).host == "a"
        assert job
    finally:
        await a.stop()
        await b.stop()


async def test_drain_wait_returns_when_the_last_job_ends(prefix, tmp_path, noop_map_path, cleanup_topology, broker):
    a = await start_host(prefix, tmp_path, noop_map_path, "a")
    try:
        await broker.open()
        job = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "3"})
        await wait_for(lambda: a.job_running(job.job_id), what="the job to run")
        cli_task = asyncio.create_task(cli(prefix, noop_map_path, "drain", "--all", "--wait"))
        result = await broker.next_result()
        assert result.status is JobStatus.SUCCEEDED
        assert not cli_task.done() or a.ledger.running == 0
        code, out, err = await cli_task
        assert code == 0, err
        assert out.splitlines()[0] == "a: draining, 1 job(s) running"
        assert out.splitlines()[-1] == "a: drained, nothing running"
        assert a.ledger.running == 0
    finally:
        await a.stop()


async def test_jobs_over_http_and_across_the_fleet(prefix, tmp_path, noop_map_path, cleanup_topology, broker):
    a = await start_host(prefix, tmp_path, noop_map_path, "a")
    b = await start_host(prefix, tmp_path, noop_map_path, "b")
    try:
        await broker.open()
        done = [await broker.submit(runs_on="alpha", env={"SECRET_TOKEN": "hunter2"}) for _ in range(4)]
        await broker.collect(4)
        running = await broker.submit(runs_on="beta", env={"NOOP_FAIL": "hang"}, timeout_s=60)
        await wait_for(lambda: a.job_running(running.job_id) or b.job_running(running.job_id), what="a running job")
        host = a if a.job_running(running.job_id) else b

        async def journaled_running() -> bool:
            # A job's log exists from its acceptance; its journal state says running a
            # moment later, when its VM has started.
            found = await host.job(running.job_id)
            return found is not None and str(getattr(found.state, "value", found.state)) == "running"

        await wait_for(journaled_running, what="the job journaled as running")
        async with aiohttp.ClientSession(headers=AUTH) as http:
            async with http.get(f"{api(host)}/jobs", params={"state": "running"}) as response:
                listed = await response.json()
                assert response.status == 200 and [j["job_id"] for j in listed["jobs"]] == [running.job_id]
            async with http.get(f"{api(host)}/jobs/{running.job_id}") as response:
                detail = await response.json()
                assert detail["state"] == "running" and detail["host"] == host.host_name and detail["result"] is None
            for other in (a, b):
                async with http.get(f"{api(other)}/jobs", params={"limit": "2"}) as response:
                    body = await response.json()
                    assert len(body["jobs"]) <= 2
                    stamps = [j["accepted_at"] for j in body["jobs"]]
                    assert stamps == sorted(stamps, reverse=True)  # newest first
            finished = done[0].job_id
            owner = a if await a.job(finished) is not None else b
            async with http.get(f"{api(owner)}/jobs/{finished}") as response:
                detail = await response.json()
                assert detail["result"]["status"] == "succeeded" and "total_s" in detail["timings"]
                assert detail["request"]["env_names"] == ["SECRET_TOKEN"] and "hunter2" not in await response.text()
            for path, status in (
                ("/jobs/not-a-uuid", 400),
                (f"/jobs/{'0' * 8}-0000-0000-0000-{'0' * 12}", 404),
                ("/jobs?state=sleeping", 400),
                ("/jobs?limit=0", 400),
                ("/jobs?since=yesterday", 400),
                ("/jobs?colour=red", 400),
            ):
                async with http.get(f"{api(a)}{path}") as response:
                    assert response.status == status, path
                    assert set(await response.json()) == {"error"}
            async with aiohttp.ClientSession() as anonymous, anonymous.get(f"{api(a)}/jobs") as response:
                assert response.status == 401
        code, out, err = await cli(prefix, noop_map_path, "jobs")
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["HOST", "JOB", "LABEL", "STATE"] and lines[-1] == "5 job(s) from 2 host(s)"
        assert {line.split()[0] for line in lines[1:-1]} == {"a", "b"}
        code, out, _ = await cli(prefix, noop_map_path, "jobs", "--state", "running")
        assert [line.split()[1] for line in out.splitlines()[1:-1]] == [running.job_id]
        code, _, err = await cli(prefix, noop_map_path, "jobs", "--limit", "0")
        assert code == 2 and "--limit" in err
    finally:
        await a.stop()
        await b.stop()


async def test_logs_of_a_job_on_another_host_whole_and_followed(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    a = await start_host(prefix, tmp_path, noop_map_path, "a")
    try:
        await broker.open()
        job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "hello from the job", "NOOP_OUTPUT_REPEAT": "3"})
        await broker.next_result()
        code, out, err = await cli(prefix, noop_map_path, "logs", job.job_id)
        assert code == 0, err
        assert out.count("hello from the job") == 3 and "ORCH-RESULT" in out
        # Followed while it runs: the lines come before the job ends, and it returns at its end.
        slow = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "first line", "NOOP_DURATION_S": "3"})
        await wait_for(lambda: a.job_running(slow.job_id), what="the job to run")
        follower = asyncio.create_task(cli(prefix, noop_map_path, "logs", "--follow", slow.job_id))
        await broker.next_result()
        code, out, err = await follower
        assert code == 0, err
        assert "first line" in out and out.rstrip().splitlines()[-1].startswith("ORCH-RESULT")
        code, _, err = await cli(prefix, noop_map_path, "logs", "00000000-0000-0000-0000-000000000000")
        assert code == 1 and "no host" in err
        code, _, err = await cli(prefix, noop_map_path, "logs", "nope")
        assert code == 2 and "not a UUID" in err
    finally:
        await a.stop()


@pytest.mark.libvirt
async def test_logs_follow_a_job_running_in_a_real_vm(
    prefix, tmp_path, test_image, test_network, cleanup_topology, broker
):
    cleanup_topology.extend(["demo", "demo-silent"])
    map_path = test_image / "image-map.yaml"
    port = free_port()
    settings = make_settings(
        prefix,
        tmp_path / "state",
        map_path,
        backend=BackendName.LIBVIRT,
        libvirt_domain_type="qemu",
        libvirt_network=test_network,
        orchestrator_id=f"test-{prefix}",
        image_dir=test_image,
        host_name="vmhost",
        http_listen=f"127.0.0.1:{port}",
        http_token=TOKEN,
        public_url=f"http://127.0.0.1:{port}",
    )
    daemon = Daemon(settings, load_image_map(map_path))
    await daemon.start()
    try:
        await broker.open()
        job = await broker.submit(runs_on="demo", script="for n in 1 2 3 4 5 6 7 8; do echo tick $n; sleep 1; done")
        console = daemon.console_path(job.job_id)
        await wait_for(
            lambda: console.exists() and b"ORCH-STARTED" in console.read_bytes(),
            timeout_s=120,
            interval_s=0.1,
            what="the job's script to start",
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "logs",
            "--follow",
            job.job_id,
            "--config",
            str(map_path),
            env={**os.environ, "AMQP_URL": AMQP_URL, "AMQP_PREFIX": prefix, "HTTP_TOKEN": TOKEN},
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        seen: list[str] = []
        unfinished_when_first_seen: bool | None = None
        assert process.stdout is not None
        while line := await asyncio.wait_for(process.stdout.readline(), timeout=120):
            text = line.decode().rstrip()
            if text.startswith("tick ") and unfinished_when_first_seen is None:
                # Measured from outside the CLI: the guest had not yet printed its last line.
                unfinished_when_first_seen = b"tick 8" not in console.read_bytes()
            seen.append(text)
        assert await process.wait() == 0, (await process.stderr.read()).decode()
        assert [text for text in seen if text.startswith("tick ")] == [f"tick {n}" for n in range(1, 9)]
        assert unfinished_when_first_seen, "the log was printed only after the job had ended, not followed live"
        assert (await broker.next_result()).status is JobStatus.SUCCEEDED
    finally:
        await daemon.stop()
