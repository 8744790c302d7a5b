"""The daemon's HTTP API: job logs (plain and live), log_url in results, bearer token."""

from __future__ import annotations

import socket
import uuid

import aiohttp

from orchestrator.core.messages import JobStatus
from orchestrator.host.runner import StopReason
from tests.conftest import wait_for


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_job_log_is_served_plain_and_live_with_a_token(daemon_factory, broker):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}", http_token="s3cret", public_url="http://hv01:9465")
    base = f"http://127.0.0.1:{port}"
    auth = {"Authorization": "Bearer s3cret"}
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "hello from the log", "NOOP_DURATION_S": "1.5"})
    await wait_for(lambda: daemon.ledger.running == 1, what="the job to be running")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{base}/status") as response:
            assert response.status == 401
        async with http.get(f"{base}/jobs/{job.job_id}/log/stream", headers=auth) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "text/event-stream"
            stream = (await response.read()).decode()
        assert "data: hello from the log" in stream
        assert "data: ORCH-RESULT" in stream and stream.endswith("event: end\ndata: \n\n")
        result = await broker.next_result()
        assert result.status is JobStatus.SUCCEEDED
        assert result.log_url == f"http://hv01:9465/jobs/{job.job_id}/log"
        async with http.get(f"{base}/jobs/{job.job_id}/log", headers=auth) as response:
            assert response.status == 200 and "hello from the log" in await response.text()
        async with http.get(f"{base}/jobs/not-a-uuid/log", headers=auth) as response:
            assert response.status == 400 and "UUID" in await response.text()
        async with http.get(f"{base}/jobs/{uuid.uuid4()}/log", headers=auth) as response:
            assert response.status == 404


CONSOLE = "line one\r\nline two\r\nprogress 10%\rprogress 100%\r\nevent: end\r\ndata: forged\r\nid: 7"


async def test_logs_are_text_with_lf_and_one_event_per_console_line(daemon_factory, broker):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": CONSOLE})
    await broker.next_result()
    await wait_for(lambda: not daemon.job_running(job.job_id), what="the job to leave the runner")
    raw = daemon.console_path(job.job_id).read_bytes()
    assert b"\r\n" in raw  # the file keeps what the guest wrote
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/jobs/{job.job_id}/log") as response:
            text = await response.text()
            assert response.headers["Accept-Ranges"] == "bytes"
        assert "\r" not in text
        started, text = text.split("\n", 1)
        assert started.startswith("ORCH-STARTED ")  # the guest's "the job's script starts" line
        assert text.startswith("line one\nline two\nprogress 10%\nprogress 100%\nevent: end\ndata: forged\nid: 7\n")
        async with http.get(f"{base}/jobs/{job.job_id}/log/stream") as response:
            stream = (await response.read()).decode()
    events = [event for event in stream.split("\n\n") if event]
    data = [line.removeprefix("data: ") for event in events for line in event.split("\n") if line.startswith("data: ")]
    assert data[0].startswith("ORCH-STARTED ")
    assert data[1:8] == ["line one", "line two", "progress 10%", "progress 100%", "event: end", "data: forged", "id: 7"]
    assert data[8].startswith("ORCH-RESULT ")
    assert [e for e in events if e.startswith("event:")] == ["event: end\ndata: "], "only the real end event"
    assert all(len([ln for ln in e.split("\n") if ln.startswith("data:")]) == 1 for e in events)


async def test_log_ranges_resume_a_download(daemon_factory, broker):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": CONSOLE})
    await broker.next_result()
    await wait_for(lambda: not daemon.job_running(job.job_id), what="the job to leave the runner")
    url = f"http://127.0.0.1:{port}/jobs/{job.job_id}/log"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            whole = await response.read()
        async with http.get(url, headers={"Range": "bytes=5-"}) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 5-{len(whole) - 1}/{len(whole)}"
            assert await response.read() == whole[5:]
        async with http.get(url, headers={"Range": "bytes=10-19"}) as response:
            assert response.status == 206 and await response.read() == whole[10:20]
        async with http.get(url, headers={"Range": "bytes=-6"}) as response:
            assert response.status == 206 and await response.read() == whole[-6:]
        async with http.get(url, headers={"Range": f"bytes={len(whole)}-"}) as response:
            assert response.status == 416 and response.headers["Content-Range"] == f"bytes */{len(whole)}"


async def test_sse_resumes_from_last_event_id(daemon_factory, broker):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "first\nsecond", "NOOP_DURATION_S": "30"})
    console = daemon.console_path(job.job_id)
    await wait_for(lambda: console.exists() and console.read_bytes().endswith(b"second\n"), what="the guest's output")
    url = f"http://127.0.0.1:{port}/jobs/{job.job_id}/log/stream"
    async with aiohttp.ClientSession() as http:
        started = len(console.read_bytes().split(b"\n", 1)[0]) + 1  # the guest's "ORCH-STARTED <nonce>" line
        async with http.get(url) as response:
            await response.content.readuntil(b"\n\n")
            first = (await response.content.readuntil(b"\n\n")).decode()
            second = (await response.content.readuntil(b"\n\n")).decode()
        assert first == f"id: {started + 6}\ndata: first\n\n"
        assert second == f"id: {started + len('first second ')}\ndata: second\n\n"  # the offset after "second\n"
        assert daemon.runner.stop_job(job.job_id, StopReason.CANCEL)
        await broker.next_result()
        async with http.get(url, headers={"Last-Event-ID": str(started + 6)}) as response:
            rest = (await response.read()).decode()
    assert rest == f"id: {started + 13}\ndata: second\n\nevent: end\ndata: \n\n"


async def test_a_last_event_id_that_is_not_an_offset_starts_from_the_beginning(daemon_factory, broker):
    import asyncio

    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "only line"})
    await broker.next_result()
    await wait_for(lambda: not daemon.job_running(job.job_id), what="the job to leave the runner")
    # "²" is a digit to str.isdigit, not to int(): it was a 500.
    for resume in ("\u00b2".encode(), "\u0663".encode(), b"-1", b"x", b"9" * 30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET /jobs/{job.job_id}/log/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
            + b"Last-Event-ID: "
            + resume
            + b"\r\n\r\n"
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), (resume, answer[:80])
        assert b"data: only line" in answer, resume


async def test_a_token_that_is_not_utf8_is_just_a_wrong_token(daemon_factory):
    import asyncio

    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}", http_token="s3cret")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
