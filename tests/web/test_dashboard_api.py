"""The dashboard's endpoints with two real daemons on the real broker: the fleet from
heartbeats, jobs across the fleet, drain and resume of another host, a job's log from
another host through this one, and who may use any of it (token, session cookie, Origin)."""

from __future__ import annotations

import asyncio
import uuid
from http.cookies import SimpleCookie

import aiohttp
import pytest

from orchestrator.core.httpserver import HttpLimits, HttpLoad
from orchestrator.host.daemon import Daemon
from orchestrator.web.app import build_app
from tests.conftest import wait_for
from tests.host.test_fleet_ops import AUTH, TOKEN, api, start_host

HEARTBEAT_S = 0.5
UNKNOWN_JOB = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
async def two_hosts(prefix, tmp_path, noop_map_path, cleanup_topology):
    """Hosts `a` and `b`, heartbeating every HEARTBEAT_S, each with a PUBLIC_URL and the token."""
    started: list[Daemon] = []
    for name in ("a", "b"):
        started.append(
            await start_host(prefix, tmp_path, noop_map_path, name, heartbeat_s=HEARTBEAT_S, drain_timeout_s=2)
        )
    yield started
    for daemon in started:
        await daemon.stop()


async def get_json(http: aiohttp.ClientSession, url: str, **kwargs) -> tuple[int, dict]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.json()


async def fleet_hosts(http: aiohttp.ClientSession, daemon: Daemon) -> dict[str, dict]:
    status, body = await get_json(http, f"{api(daemon)}/fleet")
    assert status == 200, body
    return {host["host"]: host for host in body["hosts"]}


async def test_fleet_shows_every_host_and_a_stopped_one_becomes_unreachable(two_hosts):
    a, b = two_hosts
    async with aiohttp.ClientSession(headers=AUTH) as http:

        async def both_seen() -> bool:
            return set(await fleet_hosts(http, a)) == {"a", "b"}

        await wait_for(both_seen, what="a's /fleet to show a and b", interval_s=0.1)
        hosts = await fleet_hosts(http, a)
        seen_b = hosts["b"]
        assert seen_b["labels"] == ["alpha", "beta"] and seen_b["public_url"] == api(b)
        assert (seen_b["max_concurrency"], seen_b["cpus_total"], seen_b["memory_mb_total"]) == (
            b.ledger.max_concurrency,
            64,
            64 * 1024,
        )
        assert not seen_b["unreachable"] and not seen_b["draining"] and seen_b["silent_s"] < 3 * HEARTBEAT_S
        assert {"last_seen", "warm", "warm_by_label", "running", "cpus_used", "memory_mb_used"} <= set(seen_b)
        await b.stop()

        async def b_unreachable() -> bool:
            return (await fleet_hosts(http, a))["b"]["unreachable"]

        await wait_for(b_unreachable, what="b marked unreachable", timeout_s=10, interval_s=0.2)
        assert not (await fleet_hosts(http, a))["a"]["unreachable"]


async def test_fleet_jobs_shows_a_running_job_on_either_host(two_hosts, broker):
    a, b = two_hosts
    await broker.open()
    done = await broker.submit(runs_on="alpha")
    await broker.next_result()
    running = await broker.submit(runs_on="beta", env={"NOOP_FAIL": "hang"}, timeout_s=60)
    await wait_for(lambda: a.job_running(running.job_id) or b.job_running(running.job_id), what="the job to run")
    owner = "a" if a.job_running(running.job_id) else "b"
    async with aiohttp.ClientSession(headers=AUTH) as http:
        for asked in (a, b):

            async def both_answered(asked=asked) -> bool:
                return (await get_json(http, f"{api(asked)}/fleet/jobs"))[1].get("hosts") == ["a", "b"]

            await wait_for(both_answered, what="both hosts answering", interval_s=0.2)
            status, body = await get_json(http, f"{api(asked)}/fleet/jobs")
            assert status == 200 and body["silent"] == []
            by_id = {job["job_id"]: job for job in body["jobs"]}
            assert by_id[running.job_id]["state"] == "running" and by_id[running.job_id]["host"] == owner
            assert by_id[done.job_id]["status"] == "succeeded"
        # Once both hosts answered it (with heartbeats 0.5 s apart, a loaded machine can
        # make b count a as silent for a moment, and then b asks only itself).
        answers: list[dict] = []

        async def running_from_both() -> bool:
            answers.append((await get_json(http, f"{api(b)}/fleet/jobs", params={"state": "running"}))[1])
            return answers[-1].get("hosts") == ["a", "b"]

        await wait_for(running_from_both, what="both hosts answering the running query", interval_s=0.2)
        assert [job["job_id"] for job in answers[-1]["jobs"]] == [running.job_id]
        for query, field in (
            ("state=sleeping", "state"),
            ("limit=0", "limit"),
            ("since=yesterday", "since"),
            ("colour=red", "colour"),
        ):
            status, body = await get_json(http, f"{api(a)}/fleet/jobs?{query}")
            assert status == 400 and field in body["error"], query


async def test_drain_and_resume_another_host_from_this_one(two_hosts):
    a, b = two_hosts
    async with aiohttp.ClientSession(headers=AUTH) as http:
        await wait_for(lambda: a.fleet.knows("b"), what="a to hear from b", interval_s=0.1)
        async with http.post(f"{api(a)}/fleet/hosts/b/drain") as response:
            assert response.status == 200 and await response.json() == {"host": "b", "draining": True, "running": 0}
        status, body = await get_json(http, f"{api(b)}/readyz")
        assert status == 503 and "host is draining" in body["reasons"]
        assert (await fleet_hosts(http, a))["b"]["draining"]  # at once, not at b's next heartbeat
        async with http.post(f"{api(a)}/fleet/hosts/b/resume") as response:
            assert response.status == 200 and (await response.json())["draining"] is False
        assert (await get_json(http, f"{api(b)}/readyz"))[0] == 200
        async with http.post(f"{api(b)}/fleet/hosts/b/drain") as response:  # its own host: no broker round trip
            assert response.status == 200 and a.fleet.knows("b")
        assert b.ledger.draining
        for path, status in (
            ("/fleet/hosts/nobody/drain", 404),
            ("/fleet/hosts/-x/drain", 400),
            ("/fleet/hosts/a%20b/resume", 400),
        ):
            async with http.post(f"{api(a)}{path}") as response:
                assert response.status == status, path
                assert set(await response.json()) == {"error"}


async def read_events(response: aiohttp.ClientResponse, until: str) -> list[str]:
    """The `data:` lines of an event stream up to the first that contains `until`, or its end."""
    lines: list[str] = []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: end"):
            break
        if line.startswith("data: "):
            lines.append(line[6:])
            if until in line:
                break
    return lines


async def test_log_stream_of_a_job_on_the_other_host_arrives_through_this_one(two_hosts, broker):
    a, b = two_hosts
    await a.set_draining(True)  # so the job runs on b
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "first line", "NOOP_DURATION_S": "4"})
    await wait_for(lambda: b.job_running(job.job_id), what="the job to run on b")
    async with aiohttp.ClientSession(headers=AUTH) as http:
        async with http.get(f"{api(a)}/fleet/jobs/{job.job_id}/log/stream") as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            assert (await read_events(response, until="first line"))[-1] == "first line"  # after ORCH-STARTED
            # Written after the stream opened: it comes as it is written.
            with b.console_path(job.job_id).open("a") as console:
                console.write("written later\n")
            assert await read_events(response, until="written later") == ["written later"]
            rest = await read_events(response, until="never printed")
            assert rest and rest[-1].startswith("ORCH-RESULT")
        # Once it has ended the whole log is still there, through either host.
        for asked in (a, b):
            async with http.get(f"{api(asked)}/fleet/jobs/{job.job_id}/log/stream") as response:
                lines = await read_events(response, until="never printed")
                assert lines[lines.index("first line") + 1] == "written later" and lines[-1].startswith("ORCH-RESULT")
        for path, status in ((f"/fleet/jobs/{UNKNOWN_JOB}/log/stream", 404), ("/fleet/jobs/nope/log/stream", 400)):
            status_got, body = await get_json(http, f"{api(a)}{path}")
            assert status_got == status and set(body) == {"error"}, path


# --- who may use it -------------------------------------------------------------------------


def every_route() -> list[tuple[str, str]]:
    """Every (method, path) the app serves, with its parameters filled in."""
    app = build_app(object(), token=TOKEN, load=HttpLoad(HttpLimits()))  # type: ignore[arg-type]  # routes only
    routes = {
        (route.method, route.resource.canonical.format(job_id=uuid.uuid4(), host="b"))
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    return sorted(routes)


def session_of(response: aiohttp.ClientResponse) -> SimpleCookie:
    cookies = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", []):
        cookies.load(header)
    return cookies


async def test_without_the_token_every_endpoint_but_healthz_is_401(two_hosts):
    a, _ = two_hosts
    routes = every_route()
    assert ("GET", "/") in routes and ("GET", "/fleet") in routes and ("POST", "/fleet/hosts/b/drain") in routes
    async with aiohttp.ClientSession() as http:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": TOKEN},
            {"Cookie": "orch_session=forged"},
        ):
            for method, path in routes:
                async with http.request(method, f"{api(a)}{path}", headers=headers, allow_redirects=False) as response:
                    expected = 200 if path == "/healthz" else 401
                    assert response.status == expected, (method, path, headers)
                    assert "Set-Cookie" not in response.headers, (method, path)
        assert not a.ledger.draining
        # A browser asking for the page gets the sign-in form as the 401's body.
        async with http.get(f"{api(a)}/") as response:
            page = await response.text()
            assert response.status == 401 and response.content_type == "text/html"
            assert '<form method="post" action="/login">' in page and 'name="token"' in page


async def test_a_session_cookie_only_for_the_right_token_and_only_same_origin_posts(two_hosts):
    a, _ = two_hosts
    origin = api(a)
    async with aiohttp.ClientSession() as http:
        for form in ({"token": "wrong"}, {"token": ""}, {}):
            async with http.post(f"{origin}/login", data=form, allow_redirects=False) as response:
                assert response.status == 401 and "Set-Cookie" not in response.headers
                assert "not this fleet's token" in await response.text() or not form.get("token")
        async with http.post(f"{origin}/login", json={"token": "wrong"}, allow_redirects=False) as response:
            assert response.status == 401 and "Set-Cookie" not in response.headers
        async with http.post(
            f"{origin}/login", data={"token": TOKEN}, headers={"Origin": "http://evil.example"}, allow_redirects=False
        ) as response:
            assert response.status == 403 and "Set-Cookie" not in response.headers
        async with http.post(f"{origin}/login", data={"token": TOKEN}, allow_redirects=False) as response:
            assert response.status == 303 and response.headers["Location"] == "/"
            morsel = session_of(response)["orch_session"]
        assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/" and not morsel["secure"]
        assert len(morsel.value) >= 40 and TOKEN not in morsel.value
        cookie = {"Cookie": f"orch_session={morsel.value}"}
        async with http.get(f"{origin}/", headers=cookie) as response:
            assert response.status == 200 and "dashboard/app.js" in await response.text()
        assert (await get_json(http, f"{origin}/fleet", headers=cookie))[0] == 200
        async with http.post(f"{origin}/login", json={"token": TOKEN}, allow_redirects=False) as response:
            assert response.status == 303 and "orch_session" in session_of(response)
        # A POST on the cookie's strength must come from this host's page.
        for bad in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"}, {"Referer": "http://evil.example/"}):
            async with http.post(f"{origin}/fleet/hosts/a/drain", headers={**cookie, **bad}) as response:
                assert response.status == 403, bad
        assert not a.ledger.draining
        async with http.post(f"{origin}/fleet/hosts/a/drain", headers={**cookie, "Origin": origin}) as response:
            assert response.status == 200 and a.ledger.draining
        async with http.post(f"{origin}/resume", headers={**cookie, "Referer": f"{origin}/"}) as response:
            assert response.status == 200 and not a.ledger.draining
        async with http.post(
            f"{origin}/logout", headers={**cookie, "Origin": origin}, allow_redirects=False
        ) as response:
            assert response.status == 303 and session_of(response)["orch_session"].value == ""
        assert (await http.get(f"{origin}/fleet", headers=cookie)).status == 401  # the session is gone here too


async def test_without_a_token_everything_is_open(daemon_factory):
    from tests.web.test_httpapi import free_port

    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/") as response:
            assert response.status == 200 and "dashboard/app.js" in await response.text()
        for path in ("/dashboard/app.js", "/dashboard/style.css", "/fleet", "/fleet/jobs"):
            async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                assert response.status == 200, path
        async with http.post(f"http://127.0.0.1:{port}/login", data={"token": "x"}, allow_redirects=False) as response:
            assert response.status == 303 and "Set-Cookie" not in response.headers


async def test_many_dashboards_cost_the_fleet_one_question(two_hosts, monkeypatch):
    a, _ = two_hosts
    asked = 0
    real = a.fleet.jobs

    async def counted(query):
        nonlocal asked
        asked += 1
        return await real(query)

    monkeypatch.setattr(a.fleet, "jobs", counted)
    async with aiohttp.ClientSession(headers=AUTH) as http:
        answers = await asyncio.gather(*(get_json(http, f"{api(a)}/fleet/jobs") for _ in range(20)))
    assert {status for status, _ in answers} == {200} and asked == 1
