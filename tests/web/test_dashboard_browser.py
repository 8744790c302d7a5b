"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium through
Debian's chromedriver (nothing downloaded), against real daemons on the real broker. It
signs in with the token, sees the hosts and a running job, follows the job's log live,
and drains a host with the button. Screenshots are the test's artifacts, in
$DASHBOARD_SCREENSHOTS_DIR (default /tmp/orch-test-artifacts); the README's come from
`DASHBOARD_SCREENSHOTS_DIR=docs .venv/bin/python -m pytest tests/web/test_dashboard_browser.py`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from orchestrator.host.daemon import Daemon
from tests.conftest import AMQP_URL, wait_for
from tests.host.test_fleet_ops import AUTH, TOKEN, api, start_host

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOTS_DIR", "/tmp/orch-test-artifacts"))
WAIT_S = 30


class Browser:
    """A headless Chromium; every call runs in a thread, so the daemons on this test's
    event loop keep serving the page meanwhile."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for argument in (
            "--headless=new",
            "--window-size=1440,1000",
            "--force-device-scale-factor=1",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
        ):
            options.add_argument(argument)
        if os.geteuid() == 0:
            options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
        self.driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)

    async def do(self, action: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(action, *args)

    async def until(self, condition: Callable[[Any], Any], what: str) -> Any:
        """Wait on the page (WebDriverWait polls it), failing with `what` it waited for."""
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        def wait() -> Any:
            try:
                # The page redraws what changed every poll: an element read as it is
                # replaced is simply read again.
                return WebDriverWait(
                    self.driver,
                    WAIT_S,
                    poll_frequency=0.1,
                    ignored_exceptions=[StaleElementReferenceException],
                ).until(condition)
            except TimeoutException:
                raise AssertionError(f"waited {WAIT_S} s in the browser for {what}, in vain") from None

        return await asyncio.to_thread(wait)

    async def click(self, selector: str) -> None:
        def clicked(driver: Any) -> bool:
            driver.find_element(*by_css(selector)).click()
            return True

        await self.until(clicked, f"{selector} to click")

    async def screenshot(self, name: str) -> Path:
        SHOTS.mkdir(parents=True, exist_ok=True)
        path = SHOTS / name
        await asyncio.to_thread(self.driver.save_screenshot, str(path))
        return path

    async def close(self) -> None:
        await asyncio.to_thread(self.driver.quit)


@pytest.fixture
async def browser():
    started = await asyncio.to_thread(Browser)
    yield started
    await started.close()


@pytest.fixture
async def fleet(prefix, tmp_path, noop_map_path, cleanup_topology):
    """Hosts a and b serving, and c that was there and has stopped (unreachable)."""
    hosts: list[Daemon] = []
    for name in ("a", "b", "c"):
        hosts.append(await start_host(prefix, tmp_path, noop_map_path, name, heartbeat_s=0.5, drain_timeout_s=2))
    yield hosts
    for daemon in hosts:
        await daemon.stop()


def by_css(selector: str) -> tuple[str, str]:
    from selenium.webdriver.common.by import By

    return (By.CSS_SELECTOR, selector)


def text_of(selector: str) -> Callable[[Any], str]:
    def read(driver: Any) -> str:
        found = driver.find_elements(*by_css(selector))
        return found[0].text if found else ""

    return read


async def test_the_dashboard_in_chromium(fleet, broker, browser):
    a, b, c = fleet
    await c.stop()  # it heartbeated, then went silent: the dashboard marks it unreachable
    await broker.open()
    for env in ({}, {}, {"NOOP_EXIT_CODE": "1"}, {}):
        await broker.submit(runs_on="alpha", env=env)
    await broker.collect(4)
    # The running job on b, so the page a serves shows its log through a.
    await a.set_draining(True)
    running = await broker.submit(runs_on="beta", env={"NOOP_OUTPUT": "+ ./ci/test.sh", "NOOP_DURATION_S": "120"})
    await wait_for(lambda: b.job_running(running.job_id), what="the job to run on b")
    await a.set_draining(False)

    # Signing in: the page without a session is the form; the token makes a session.
    driver = browser.driver
    await browser.do(driver.get, f"{api(a)}/")
    await browser.until(lambda d: d.find_elements(*by_css("input#token")), "the sign-in form")
    await browser.screenshot("dashboard-login.png")
    token_field = await browser.do(driver.find_element, *by_css("input#token"))
    await browser.do(token_field.send_keys, TOKEN)
    await browser.do(token_field.submit)
    await browser.until(lambda d: d.find_elements(*by_css("#hosts article.host")), "the host cards")
    cookie = await browser.do(driver.get_cookie, "orch_session")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # The fleet: three hosts, c unreachable, and the running job with its host.
    def host_states(d: Any) -> dict[str, str]:
        return {
            card.get_attribute("data-host"): card.get_attribute("data-state")
            for card in d.find_elements(*by_css("#hosts article.host"))
        }

    await browser.until(
        lambda d: host_states(d).get("c") == "unreachable" and len(host_states(d)) == 3,
        "c marked unreachable beside a and b",
    )
    row = f'#jobs tr[data-job="{running.job_id}"]'
    await browser.until(lambda d: "running" in text_of(row)(d), "the running job in the jobs table")
    await browser.until(lambda d: "b" in text_of(row)(d).split(), "the job's host in its row")
    await browser.until(lambda d: host_states(d) == {"a": "idle", "b": "busy", "c": "unreachable"}, "a idle, b busy")
    await browser.until(lambda d: d.find_elements(*by_css("#jobs tr.status-failed")), "the failed job, marked")
    # Where each host is connected (on a cluster: which node), and c's last known node.
    node = f"on broker node 127.0.0.1:{urlsplit(AMQP_URL).port or 5672}"
    assert node in await browser.until(text_of('#hosts article[data-host="a"] .node'), "a's broker node")
    assert (await browser.until(text_of('#hosts article[data-host="c"] .node'), "c's broker node")).startswith(
        "last on"
    )
    summary = (await browser.until(text_of("#summary"), "the summary")).upper()
    assert "UNREACHABLE" in summary and "FAILED RECENTLY" in summary
    await browser.screenshot("dashboard-fleet.png")

    # Its log, live: what the job prints after the pane opened arrives in the pane.
    await browser.click(row)
    await browser.until(lambda d: "+ ./ci/test.sh" in text_of("#log-lines")(d), "the job's first line in the log pane")
    console = b.console_path(running.job_id)
    later = [
        "collecting 214 tests",
        "tests/test_api.py ........................ [ 11%]",
        "tests/test_fleet.py ................ [ 19%]",
        "tests/test_store.py ...... [ 22%]",
        "still running: written after the log pane opened",
    ]
    with console.open("a") as out:
        out.write("\n".join(later) + "\n")
    await browser.until(lambda d: later[-1] in text_of("#log-lines")(d), "lines written after the pane opened")
    assert await browser.until(text_of("#log-state"), "the log's state") == "streaming"
    assert not a.console_path(running.job_id).exists()  # so the lines came through a, from b
    await browser.screenshot("dashboard-log.png")

    # Drain b (busy, another host) with its button: the card says so, and so does b's /readyz.
    await browser.click('button.drain[data-host="b"]')
    await browser.until(lambda d: host_states(d).get("b") == "draining", "b shown draining")
    async with aiohttp.ClientSession(headers=AUTH) as http, http.get(f"{api(b)}/readyz") as response:
        assert response.status == 503 and "host is draining" in (await response.json())["reasons"]
    assert b.job_running(running.job_id)  # its running job goes on
    await browser.until(lambda d: d.find_elements(*by_css('button.resume[data-host="b"]')), "b's Resume button")
    # The same page in a dark system theme.
    await browser.do(
        driver.execute_cdp_cmd,
        "Emulation.setEmulatedMedia",
        {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
    )
    await browser.until(
        lambda d: d.execute_script("return matchMedia('(prefers-color-scheme: dark)').matches"), "the dark theme"
    )
    await browser.screenshot("dashboard-dark.png")
