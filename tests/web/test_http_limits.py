"""Hostile HTTP clients cost the host a bounded share and never fail a job: connection
cap, header and keep-alive timeouts, log stream cap, the open-files limit raised at
start. The daemon runs as a child process with its descriptors and address space
capped, and is measured from outside (/proc)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from orchestrator.core.messages import JobStatus
from tests.conftest import wait_for
from tests.host.test_reliability import daemon_env
from tests.support.daemonproc import DaemonProcess
from tests.support.procstat import PeakUse, cpu_seconds, ensure_own_descriptors, open_fds, open_files_limit, with_limits
from tests.support.rawhttp import close_all, closed_by_peer, metric, open_idle, request_head, scrape
from tests.web.test_httpapi import free_port


def tracebacks(daemon: DaemonProcess) -> list[str]:
    return [line for line in daemon.lines if "Traceback" in line]


IDLE = 1100
FD_LIMIT = 1024
MAX_CONNECTIONS = 256
# Long enough that the connections refused at the cap (closed at once) are told apart
# from those closed at the header timeout even on a loaded 2-core machine.
HEADER_TIMEOUT_S = 5.0


async def test_idle_connections_never_take_the_descriptors_jobs_need(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    if not ensure_own_descriptors(IDLE + 200):
        pytest.skip(f"this test process cannot hold {IDLE} connections (hard RLIMIT_NOFILE)")
    port = free_port()
    env = daemon_env(
        prefix,
        tmp_path / "state",
        noop_map_path,
        ORCH_BACKEND="noop",
        HTTP_LISTEN=f"127.0.0.1:{port}",
        HTTP_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
        HTTP_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
    )
    daemon = await DaemonProcess(env, preexec_fn=with_limits(nofile=(FD_LIMIT, FD_LIMIT))).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    baseline = open_fds(pid)
    await broker.open()
    use = PeakUse(pid)
    loop = asyncio.get_running_loop()
    opened_at = loop.time()
    idle = await open_idle(port, IDLE)
    await asyncio.sleep(0.3)  # the refused ones are closed at once, well before the header timeout
    refused = [c for c in idle if closed_by_peer(c)]
    counted_at = loop.time()
    assert counted_at - opened_at < HEADER_TIMEOUT_S - 0.5, "too slow to tell the cap from the header timeout"
    assert IDLE - MAX_CONNECTIONS <= len(refused) < IDLE, (
        f"{IDLE - len(refused)} held open, the cap is {MAX_CONNECTIONS}"
    )
    jobs = [await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "ok"}) for _ in range(6)]

    results = await broker.collect(len(jobs), timeout_s=30)
    failed = {job_id: r.summary for job_id, r in results.items() if r.status is not JobStatus.SUCCEEDED}
    assert not failed, failed
    await wait_for(
        lambda: all(closed_by_peer(c) for c in idle),
        timeout_s=HEADER_TIMEOUT_S + 3,
        what="the daemon to close the connections that never sent headers",
    )
    peak = (await use.stop()).fds
    assert peak < FD_LIMIT - 100, f"the daemon held {peak} descriptors of {FD_LIMIT}"
    # Beyond the cap, a connection lives for one turn of the daemon's loop, which
    # accepts up to its listen backlog (128) at a time.
    assert peak <= baseline + MAX_CONNECTIONS + 128 + 20, (baseline, peak)
    await wait_for(lambda: open_fds(pid) <= baseline + 5, what="the daemon's descriptors back to its baseline")
    metrics = await scrape(port)
    assert metric(metrics, "orchestrator_http_refused_total", '{setting="HTTP_MAX_CONNECTIONS"}') == len(refused)
    assert metric(metrics, "orchestrator_http_connections") == 1  # this scrape
    lines = daemon.events("http.connections_refused")
    assert 1 <= len(lines) <= 2 and lines[0]["setting"] == "HTTP_MAX_CONNECTIONS", lines
    assert not tracebacks(daemon), tracebacks(daemon)[:3]
    close_all(idle)
    assert await daemon.stop() == 0


async def test_slow_headers_and_idle_keep_alive_connections_are_closed_at_the_header_timeout(
    prefix, tmp_path, noop_map_path, cleanup_topology
):
    port = free_port()
    env = daemon_env(
        prefix,
        tmp_path / "state",
        noop_map_path,
        ORCH_BACKEND="noop",
        HTTP_LISTEN=f"127.0.0.1:{port}",
        HTTP_HEADER_TIMEOUT_S="1",
    )
    daemon = await DaemonProcess(env, preexec_fn=with_limits(nofile=(FD_LIMIT, FD_LIMIT))).start()
    loop = asyncio.get_running_loop()

    status, headers, (reader, writer) = await request_head(port, "/healthz")
    assert status == 200 and headers.get("connection", "").lower() != "close"
    await reader.readexactly(int(headers["content-length"]))
    answered_at = loop.time()
    assert await asyncio.wait_for(reader.read(), 4) == b"", "a keep-alive connection gone idle is closed"
    assert 0.8 <= loop.time() - answered_at <= 3
    writer.close()

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started_at = loop.time()
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    while not reader.at_eof() and reader.exception() is None and loop.time() - started_at < 4:
        writer.write(b"X-Slow: one header line at a time\r\n")  # never the blank line that ends them
        await asyncio.sleep(0.2)
    assert reader.at_eof() or reader.exception() is not None, "headers sent slowly are cut off"
    assert 0.8 <= loop.time() - started_at <= 3
    writer.transport.abort()
    assert not tracebacks(daemon), tracebacks(daemon)[:3]
    assert await daemon.stop() == 0


MAX_STREAMS = 8


async def test_log_streams_are_capped_and_a_dropped_stream_ends_at_once(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    port = free_port()
    state = tmp_path / "state"
    env = daemon_env(
        prefix,
        state,
        noop_map_path,
        ORCH_BACKEND="noop",
        HTTP_LISTEN=f"127.0.0.1:{port}",
        HTTP_MAX_STREAMS=str(MAX_STREAMS),
    )
    daemon = await DaemonProcess(env, preexec_fn=with_limits(nofile=(FD_LIMIT, FD_LIMIT))).start()
    assert daemon.process is not None
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "hello", "NOOP_DURATION_S": "60"})
    console = state / "logs" / f"{job.job_id}.console"
    await wait_for(lambda: console.exists() and b"hello" in console.read_bytes(), what="the job's first output")
    path = f"/jobs/{job.job_id}/log/stream"

    streams = [await request_head(port, path) for _ in range(MAX_STREAMS)]
    assert [status for status, _, _ in streams] == [200] * MAX_STREAMS
    for _, _, (reader, _) in streams:
        await asyncio.wait_for(reader.readuntil(b"data: hello"), 5)
    refusals = [await request_head(port, path) for _ in range(40)]
    status, headers, _ = refusals[0]
    assert status == 503 and headers["retry-after"].isdigit()
    assert {status for status, _, _ in refusals} == {503}
    close_all([connection for _, _, connection in refusals])
    assert metric(await scrape(port), "orchestrator_http_streams") == MAX_STREAMS

    close_all([connection for _, _, connection in streams])  # gone without a goodbye
    await wait_for(
        lambda: _streams_served(port, 0), timeout_s=3, interval_s=0.1, what="the dropped streams' handlers to end"
    )
    before = cpu_seconds(daemon.process.pid)
    await asyncio.sleep(2)
    assert cpu_seconds(daemon.process.pid) - before < 0.2, "the daemon is busy with streams nobody reads"
    assert metric(await scrape(port), "orchestrator_http_refused_total", '{setting="HTTP_MAX_STREAMS"}') == 40
    lines = daemon.events("http.streams_refused")
    assert 1 <= len(lines) <= 2 and lines[0]["setting"] == "HTTP_MAX_STREAMS", lines
    assert not tracebacks(daemon), tracebacks(daemon)[:3]
    await daemon.kill()  # its 60 s job is of no further interest


async def _streams_served(port: int, count: int) -> bool:
    return metric(await scrape(port), "orchestrator_http_streams") == count


async def test_a_client_that_drops_a_download_or_a_stream_costs_no_traceback(
    prefix, tmp_path, noop_map_path, cleanup_topology
):
    port = free_port()
    state = tmp_path / "state"
    env = daemon_env(prefix, state, noop_map_path, ORCH_BACKEND="noop", HTTP_LISTEN=f"127.0.0.1:{port}")
    daemon = await DaemonProcess(env, preexec_fn=with_limits(nofile=(FD_LIMIT, FD_LIMIT))).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    baseline = open_fds(pid)
    job_id = str(uuid.uuid4())
    (state / "logs" / f"{job_id}.console").write_bytes(b"a console line of a long log\r\n" * 1_000_000)
    for path in (f"/jobs/{job_id}/log", f"/jobs/{job_id}/log/stream"):
        status, _, (reader, writer) = await request_head(port, path)
        assert status == 200
        await reader.readexactly(100_000)
        writer.transport.abort()  # gone mid-transfer, with megabytes still to send
    # Each handler holds the log file open while it sends: back to the baseline, both have ended.
    await wait_for(lambda: open_fds(pid) <= baseline, timeout_s=5, interval_s=0.1, what="both handlers to end")
    assert not tracebacks(daemon), tracebacks(daemon)[:3]
    assert await daemon.stop() == 0


async def test_the_daemon_raises_its_open_files_limit_to_the_hard_limit(
    prefix, tmp_path, noop_map_path, cleanup_topology
):
    env = daemon_env(prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop")
    daemon = await DaemonProcess(env, preexec_fn=with_limits(nofile=(1024, 4096))).start()
    assert daemon.process is not None
    assert open_files_limit(daemon.process.pid) == (4096, 4096)
    [event] = daemon.events("daemon.open_files_limit")
    assert (event["before"], event["soft"], event["hard"]) == (1024, 4096, 4096)
    assert await daemon.stop() == 0


async def test_refusals_are_logged_at_once_then_at_most_once_a_window_with_their_count(caplog):
    from orchestrator.core.httpserver import RefusalLog

    refusals = RefusalLog("http.connections_refused", setting="HTTP_MAX_CONNECTIONS", limit=256, window_s=0.2)

    def logged() -> list[int]:
        return [r.fields["count"] for r in caplog.records if r.getMessage() == "http.connections_refused"]

    for _ in range(5):
        refusals.note()
    assert logged() == [1]  # the first at once, the next four wait for the window's end
    await asyncio.sleep(0.3)
    assert logged() == [1, 4]
    await asyncio.sleep(0.3)  # a quiet window: nothing to say
    refusals.note()
    assert logged() == [1, 4, 1]
    refusals.note()
    refusals.close()
    assert logged() == [1, 4, 1, 1] and refusals.total == 7
    [record] = caplog.records[:1]
    assert record.fields["setting"] == "HTTP_MAX_CONNECTIONS" and record.fields["window_s"] == 0.2
