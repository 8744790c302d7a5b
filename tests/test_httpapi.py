"""The daemon's HTTP API: job logs (plain and live), log_url in results, bearer token."""

from __future__ import annotations

import socket
import uuid

import aiohttp

from orchestrator.messages import JobStatus
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
