"""The daemon against the real broker with the noop backend: the job flow and bad input."""

from __future__ import annotations

import uuid

from orchestrator.core.messages import JobStatus
from orchestrator.core.topology import REASON_HEADER
from tests.conftest import SHA, wait_for


async def test_enqueued_job_runs_and_succeeds(daemon_factory, broker):
    daemon = await daemon_factory()
    await broker.open()
    request = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "hello from noop"})
    result = await broker.next_result()
    assert result.request_id == request.request_id
    assert result.status is JobStatus.SUCCEEDED and result.success and result.exit_code == 0
    assert result.host == daemon.settings.host_name and result.label == "alpha"
    assert result.commit_sha == SHA
    console = (daemon.console_path(request.job_id)).read_text()
    assert "hello from noop" in console


async def test_failing_job_reports_exit_code(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    await broker.submit(runs_on="beta", env={"NOOP_EXIT_CODE": "3"})
    result = await broker.next_result()
    assert result.status is JobStatus.FAILED and not result.success
    assert result.exit_code == 3


async def test_default_label_and_alias_chain_reach_the_canonical_queue(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    no_label = await broker.submit()
    via_alias = await broker.submit(runs_on="a")
    results = await broker.collect(2)
    assert {r.label for r in results.values()} == {"alpha"}
    assert set(results) == {no_label.job_id, via_alias.job_id}


async def test_malformed_message_goes_to_dlq_with_reason_and_daemon_keeps_serving(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    await broker.publish_raw(b"{not json", "alpha")
    await broker.publish_raw(b'{"request_id": "nope", "repo_url": "https://x/y", "commit_sha": "zz"}', "alpha")
    dead = await broker.dead_letters(2)
    reasons = sorted(m.headers[REASON_HEADER] for m in dead)
    assert reasons[0].startswith("invalid job request:") and "request_id" in reasons[0] and "commit_sha" in reasons[0]
    assert reasons[1].startswith("not JSON")
    assert {m.body for m in dead} == {
        b"{not json",
        b'{"request_id": "nope", "repo_url": "https://x/y", "commit_sha": "zz"}',
    }
    request = await broker.submit(runs_on="alpha")
    result = await broker.next_result()
    assert result.request_id == request.request_id and result.status is JobStatus.SUCCEEDED


async def test_unknown_label_gets_error_result_listing_labels(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    request = await broker.submit(runs_on="no-such-label")
    result = await broker.next_result()
    assert result.request_id == request.request_id
    assert result.status is JobStatus.ERROR
    assert "unknown label 'no-such-label'" in result.summary
    for label in ("alpha", "beta", "alpha-latest", "a"):
        assert label in result.summary


async def test_legacy_routing_key_is_rerouted_by_runs_on(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    request = await broker.submit(routing_key="jobrequest.v1", runs_on="beta")
    default = await broker.submit(routing_key="jobrequest.v1")
    results = await broker.collect(2)
    assert results[request.job_id].label == "beta" and results[request.job_id].status is JobStatus.SUCCEEDED
    assert results[default.job_id].label == "alpha"


async def test_request_past_deadline_is_answered_stale(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    await broker.submit(runs_on="alpha", deadline="2020-01-01T00:00:00Z")
    result = await broker.next_result()
    assert result.status is JobStatus.ERROR and result.summary.startswith("stale")


async def test_request_above_image_cap_is_refused_with_the_field(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    await broker.submit(runs_on="alpha", cpus=9)
    result = await broker.next_result()
    assert result.status is JobStatus.ERROR
    assert result.summary.startswith("cpus: 9 is above image 'alpha'")


async def test_unknown_size_preset_is_refused(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    await broker.submit(runs_on="alpha", size="huge")
    result = await broker.next_result()
    assert result.status is JobStatus.ERROR and "size: unknown size preset 'huge'" in result.summary


async def test_boot_failure_and_missing_result_line_are_errors(daemon_factory, broker):
    await daemon_factory()
    await broker.open()
    boot = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "boot"})
    silent = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "no-result", "NOOP_OUTPUT": "kernel panic here"})
    results = await broker.collect(2)
    assert results[boot.job_id].status is JobStatus.ERROR and "failed to start" in results[boot.job_id].summary
    assert results[silent.job_id].status is JobStatus.ERROR
    assert "kernel panic here" in results[silent.job_id].console_tail


async def test_hung_job_times_out_and_vm_is_destroyed(daemon_factory, broker):
    daemon = await daemon_factory()
    await broker.open()
    await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang"}, timeout_s=1)
    result = await broker.next_result()
    assert result.status is JobStatus.TIMEOUT
    assert await daemon.router.list_ours() == []


async def test_redelivered_request_is_not_run_twice(daemon_factory, broker):
    daemon = await daemon_factory()
    await broker.open()
    job_id = str(uuid.uuid4())
    await broker.submit(runs_on="alpha", request_id=job_id)
    first = await broker.next_result()
    assert first.status is JobStatus.SUCCEEDED
    await broker.submit(runs_on="alpha", request_id=job_id)
    marker = await broker.submit(runs_on="alpha")
    # Results arrive in order per queue: the marker's result proves the duplicate was handled.
    second = await broker.next_result()
    assert str(second.request_id) == marker.job_id
    assert not broker.conflicts and broker.redeliveries == 0

    async def both_confirmed() -> bool:  # the confirm may land just after the result
        return await daemon.journal.counts() == {"published": 2}

    await wait_for(both_confirmed, timeout_s=5, what="both results' publish confirms in the journal")
