"""The daemon's histograms and gauges on /metrics, recorded from real work on the noop
backend against the real broker: a job's queue wait, boot, first command and run, a warm
pool VM's boot, image preparations (downloaded and failed), the outbox backlog across a
broker outage, event-loop lag, and the draining state."""

from __future__ import annotations

import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.core.imagemap import load_image_map
from orchestrator.core.images import PrepState
from orchestrator.core.messages import JobStatus
from tests.conftest import NOOP_MAP, wait_for
from tests.support.fakes.counting_noop import CountingNoop
from tests.support.rawhttp import scrape
from tests.web.test_httpapi import free_port

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a series that does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scraped(port: int) -> Samples:
    return parse(await scrape(port))


def warm_map_path(tmp_path: Path, *, ready: int = 1) -> Path:
    document = yaml.safe_load(NOOP_MAP)
    document["images"]["alpha"]["warm"] = {"ready": ready}
    path = tmp_path / "warm-map.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def test_a_cold_job_is_timed_from_queue_to_finish_by_label(daemon_factory, broker):
    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await broker.open()
    before = await scraped(port)
    assert value(before, "orchestrator_job_queue_wait_seconds_count", label="alpha") == 0
    submitted = datetime.now(UTC) - timedelta(seconds=90)  # sat in the queue for 90 s
    await broker.submit(runs_on="alpha", submitted_at=submitted.isoformat(), env={"NOOP_DURATION_S": "0.3"})
    result = await broker.next_result()
    assert result.status is JobStatus.SUCCEEDED
    after = await scraped(port)
    timings = result.timings

    wait = dict(label="alpha")
    assert value(after, "orchestrator_job_queue_wait_seconds_count", **wait) == 1
    assert abs(value(after, "orchestrator_job_queue_wait_seconds_sum", **wait) - timings["queued_s"]) < 0.01
    assert value(after, "orchestrator_job_queue_wait_seconds_bucket", le="60.0", **wait) == 0
    assert value(after, "orchestrator_job_queue_wait_seconds_bucket", le="120.0", **wait) == 1

    run = dict(label="alpha", status="succeeded")
    assert value(after, "orchestrator_job_run_seconds_count", **run) == 1
    assert abs(value(after, "orchestrator_job_run_seconds_sum", **run) - timings["run_s"]) < 0.01
    assert timings["run_s"] >= 0.3

    first = dict(label="alpha", start="cold")
    assert value(after, "orchestrator_job_to_first_command_seconds_count", **first) == 1
    assert (
        abs(value(after, "orchestrator_job_to_first_command_seconds_sum", **first) - timings["to_first_command_s"])
        < 0.01
    )
    assert value(after, "orchestrator_job_to_first_command_seconds_count", label="alpha", start="warm") == 0

    boot = dict(label="alpha", kind="job")
    assert value(after, "orchestrator_vm_boot_seconds_count", **boot) == 1
    assert 0 < value(after, "orchestrator_vm_boot_seconds_sum", **boot) <= timings["to_first_command_s"] + 0.01
    # beta ran nothing: none of its series moved
    assert value(after, "orchestrator_job_queue_wait_seconds_count", label="beta") == 0


async def test_a_failed_job_is_timed_under_its_status(daemon_factory, broker):
    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await broker.open()
    await broker.submit(runs_on="beta", env={"NOOP_EXIT_CODE": "3"})
    await broker.submit(runs_on="beta", env={"NOOP_FAIL": "boot"})
    results = await broker.collect(2)
    assert sorted(r.status.value for r in results.values()) == ["error", "failed"]
    after = await scraped(port)
    assert value(after, "orchestrator_job_run_seconds_count", label="beta", status="failed") == 1
    # A VM that never started has no run, no boot and no first command; it still waited.
    assert value(after, "orchestrator_job_run_seconds_count", label="beta", status="error") == 0
    assert value(after, "orchestrator_vm_boot_seconds_count", label="beta", kind="job") == 1
    assert value(after, "orchestrator_job_queue_wait_seconds_count", label="beta") == 2


async def test_a_warm_job_and_its_pool_vm_are_timed_apart_from_cold_ones(daemon_factory, broker, tmp_path):
    port = free_port()
    path = warm_map_path(tmp_path)
    daemon = await daemon_factory(
        load_image_map(path), backend=CountingNoop(), config=path, http_listen=f"127.0.0.1:{port}"
    )
    await wait_for(lambda: daemon.pools.status()["alpha"]["ready"] == 1, what="the pool VM to be ready")
    ready = await scraped(port)
    assert value(ready, "orchestrator_vm_boot_seconds_count", label="alpha", kind="pool") == 1
    assert value(ready, "orchestrator_warm_wanted", label="alpha") == 1
    await broker.open()
    await broker.submit(runs_on="alpha")
    result = await broker.next_result()
    assert result.status is JobStatus.SUCCEEDED
    after = await scraped(port)
    warm = dict(label="alpha", start="warm")
    assert value(after, "orchestrator_job_to_first_command_seconds_count", **warm) == 1
    assert (
        abs(
            value(after, "orchestrator_job_to_first_command_seconds_sum", **warm) - result.timings["to_first_command_s"]
        )
        < 0.01
    )
    assert (
        value(after, "orchestrator_vm_boot_seconds_count", label="alpha", kind="job") == 0
    )  # it booted no VM of its own


def image_map_with_sources(source: Path, image_dir: Path) -> str:
    sha = hashlib.sha256(source.read_bytes()).hexdigest()
    return (
        "default_label: alpha\nimages:\n"
        "  alpha:\n    backend: noop\n    local_path: /nonexistent/alpha.img\n"
        f"  beta:\n    backend: noop\n    source: file://{source}\n    local_path: {image_dir}/beta.img\n"
        f'    sha256: "{sha}"\n'
        f"  gamma:\n    backend: noop\n    source: file://{source}.missing\n    local_path: {image_dir}/gamma.img\n"
    )


async def test_image_preparations_are_timed_and_measured_by_label_and_outcome(
    daemon_factory, cleanup_topology, noop_map_path, tmp_path
):
    cleanup_topology.append("gamma")
    source, image_dir = tmp_path / "release.img", tmp_path / "images"
    source.write_bytes(b"release one\n" * 50_000)
    noop_map_path.write_text(image_map_with_sources(source, image_dir))
    port = free_port()
    daemon = await daemon_factory(load_image_map(noop_map_path), image_dir=image_dir, http_listen=f"127.0.0.1:{port}")
    await wait_for(lambda: daemon.images.state("beta").ready, what="beta's image to be installed")
    await wait_for(lambda: daemon.images.state("gamma").state is PrepState.FAILED, what="gamma's preparation to fail")
    after = await scraped(port)
    done = dict(label="beta", outcome="downloaded")
    assert value(after, "orchestrator_image_prepare_seconds_count", **done) == 1
    assert value(after, "orchestrator_image_prepare_seconds_sum", **done) > 0
    assert value(after, "orchestrator_image_prepare_bytes_count", **done) == 1
    assert value(after, "orchestrator_image_prepare_bytes_sum", **done) == source.stat().st_size
    assert value(after, "orchestrator_image_prepare_seconds_count", label="gamma", outcome="failed") >= 1
    # Series exist from zero before anything happens to them, so a first failure is an
    # increase an alert sees; an image without a source has none.
    assert (
        "orchestrator_image_prepare_seconds_count",
        frozenset({"label": "beta", "outcome": "failed"}.items()),
    ) in after
    assert value(after, "orchestrator_image_prepare_seconds_count", label="beta", outcome="failed") == 0
    assert not [
        key for key in after if dict(key[1]).get("label") == "alpha" and key[0].startswith("orchestrator_image_")
    ]


async def test_the_outbox_backlog_counts_unconfirmed_results_and_returns_to_zero(daemon_factory, broker, amqp_proxy):
    port = free_port()
    daemon = await daemon_factory(amqp_url=amqp_proxy.url, http_listen=f"127.0.0.1:{port}")
    await broker.open()
    assert value(await scraped(port), "orchestrator_outbox_backlog") == 0
    job = await broker.submit(runs_on="alpha", env={"NOOP_DURATION_S": "1"})

    async def backlog() -> float:
        return value(await scraped(port), "orchestrator_outbox_backlog")

    await wait_for(lambda: daemon.ledger.running == 1, what="the job to start")
    amqp_proxy.down()  # the job finishes while the broker is away: its result waits
    await wait_for(lambda: _eq(backlog(), 1), timeout_s=60, interval_s=0.2, what="a backlog of one result")
    amqp_proxy.up()
    result = await broker.next_result(timeout_s=90)
    assert result.request_id == job.request_id
    await wait_for(lambda: _eq(backlog(), 0), timeout_s=60, interval_s=0.2, what="the backlog to be empty again")


async def _eq(measured, expected: float) -> bool:
    return await measured == expected


async def test_a_blocked_event_loop_shows_as_lag(daemon_factory):
    """The daemon measures how late a 0.5 s sleep wakes: blocking the loop for 0.8 s
    makes one wake at least 0.3 s late, wherever in the sleep the block falls."""
    port = free_port()
    await daemon_factory(http_listen=f"127.0.0.1:{port}")

    def late(samples: Samples) -> float:  # wakes later than 0.25 s
        return value(samples, "orchestrator_event_loop_lag_seconds_count") - value(
            samples, "orchestrator_event_loop_lag_seconds_bucket", le="0.25"
        )

    await wait_for(lambda: _measured(port), what="a first measurement")
    before = await scraped(port)
    time.sleep(0.8)  # on the loop: what a blocking call in the daemon would do
    await wait_for(lambda: _moved(port, before), what="the lag to be measured")
    after = await scraped(port)
    assert late(after) - late(before) >= 1
    lag = value(after, "orchestrator_event_loop_lag_seconds_sum") - value(
        before, "orchestrator_event_loop_lag_seconds_sum"
    )
    assert lag >= 0.3


async def _measured(port: int) -> bool:
    return value(await scraped(port), "orchestrator_event_loop_lag_seconds_count") > 0


async def _moved(port: int, before: Samples) -> bool:
    count = "orchestrator_event_loop_lag_seconds_count"
    return value(await scraped(port), count) > value(before, count)


async def test_draining_is_a_gauge(daemon_factory):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    assert value(await scraped(port), "orchestrator_draining") == 0
    daemon.ledger.set_draining(draining=True)
    assert value(await scraped(port), "orchestrator_draining") == 1
    daemon.ledger.set_draining(draining=False)
    assert value(await scraped(port), "orchestrator_draining") == 0


async def test_two_daemons_in_one_process_keep_their_own_series(daemon_factory, broker):
    """No global registry: what one daemon records never shows on the other's /metrics."""
    ports = free_port(), free_port()
    first = await daemon_factory(http_listen=f"127.0.0.1:{ports[0]}")
    second = await daemon_factory(http_listen=f"127.0.0.1:{ports[1]}", capacity_map={"alpha": 0})
    await broker.open()
    await broker.submit(runs_on="alpha")
    await broker.next_result()
    assert first.runner.finished["succeeded"] == 1 and not second.runner.finished
    assert value(await scraped(ports[0]), "orchestrator_job_queue_wait_seconds_count", label="alpha") == 1
    assert value(await scraped(ports[1]), "orchestrator_job_queue_wait_seconds_count", label="alpha") == 0
