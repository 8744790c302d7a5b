"""Reloading the image map (SIGHUP) on the real broker: new labels are consumed, removed
labels are left in the broker for other hosts, a bad map is refused and the old one
stays, and running jobs are never touched."""

from __future__ import annotations

import signal
from pathlib import Path

import aio_pika

from orchestrator.core.messages import JobStatus
from tests.conftest import NOOP_MAP, wait_for
from tests.host.test_reliability import daemon_env
from tests.support.daemonproc import DaemonProcess

GAMMA = "  gamma:\n    backend: noop\n    local_path: /nonexistent/gamma.img\n    size: small\n"
WITHOUT_BETA = NOOP_MAP.split("  beta:\n")[0] + GAMMA


async def consumers_on(amqp: aio_pika.abc.AbstractRobustConnection, queue_name: str) -> int:
    channel = await amqp.channel()
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.consumer_count
    finally:
        await channel.close()


async def test_reload_adds_and_removes_labels_and_keeps_running_jobs(
    daemon_factory, broker, noop_map_path, amqp, cleanup_topology
):
    cleanup_topology.append("gamma")
    daemon = await daemon_factory()
    await broker.open()
    running = await broker.submit(runs_on="beta", env={"NOOP_DURATION_S": "1.5"})
    await wait_for(lambda: daemon.job_running(running.job_id), what="the beta job to start")
    noop_map_path.write_text(WITHOUT_BETA)
    assert await daemon.reload()
    assert sorted(daemon.heartbeat().labels) == ["alpha", "gamma"]
    assert await consumers_on(amqp, broker.topology.label_queue("beta")) == 0
    gamma = await broker.submit(runs_on="gamma")
    left = await broker.submit(runs_on="beta")
    results = await broker.collect(2)
    assert results[running.job_id].status is JobStatus.SUCCEEDED, "the running job was not touched"
    assert results[gamma.job_id].status is JobStatus.SUCCEEDED
    assert await broker.ready_count("beta") == 1, f"{left.job_id} stays queued for other hosts"


async def test_a_bad_map_is_refused_and_the_old_one_stays(daemon_factory, broker, noop_map_path, caplog):
    daemon = await daemon_factory()
    noop_map_path.write_text(NOOP_MAP + "    cpu: 2\n")
    assert not await daemon.reload()
    refusal = next(r for r in caplog.records if r.getMessage() == "config.reload_refused")
    assert f"{noop_map_path}:18: images.beta.cpu: unknown key (did you mean 'cpus'?)" in refusal.fields["error"]
    await broker.open()
    job = await broker.submit(runs_on="beta")
    assert (await broker.next_result()).request_id == job.request_id


async def test_sighup_reloads_a_running_daemon(prefix, tmp_path, noop_map_path, broker, cleanup_topology):
    cleanup_topology.append("gamma")
    daemon = await DaemonProcess(daemon_env(prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop")).start()
    noop_map_path.write_text(NOOP_MAP + GAMMA)
    daemon.process.send_signal(signal.SIGHUP)
    await wait_for(
        lambda: any('"config.reloaded"' in line for line in daemon.lines), what="the daemon to log config.reloaded"
    )
    await broker.open()
    job = await broker.submit(runs_on="gamma")
    result = await broker.next_result()
    assert result.request_id == job.request_id and result.status is JobStatus.SUCCEEDED and result.label == "gamma"
    assert await daemon.stop() == 0


def file_image_map(source: Path, image_dir: Path, sha256: str) -> str:
    return (
        "default_label: alpha\nimages:\n"
        "  alpha:\n    backend: noop\n    local_path: /nonexistent/alpha.img\n"
        f"  beta:\n    backend: noop\n    source: file://{source}\n    local_path: {image_dir}/beta.img\n"
        f'    sha256: "{sha256}"\n'
    )


async def test_a_changed_image_is_stale_after_reload_and_prepared_again(
    daemon_factory, broker, noop_map_path, tmp_path
):
    import hashlib

    from orchestrator.core.imagemap import load_image_map
    from orchestrator.core.images import ImageMeta

    source, image_dir = tmp_path / "release.img", tmp_path / "images"
    source.write_bytes(b"release one\n" * 4096)
    first_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    noop_map_path.write_text(file_image_map(source, image_dir, first_sha))
    daemon = await daemon_factory(load_image_map(noop_map_path), image_dir=image_dir)
    await wait_for(lambda: daemon.images.state("beta").ready, what="the first release to be installed")
    source.write_bytes(b"release two\n" * 4096)  # a new release, pinned by the map
    second_sha = hashlib.sha256(source.read_bytes()).hexdigest()
    noop_map_path.write_text(file_image_map(source, image_dir, second_sha))
    assert await daemon.reload()
    await wait_for(lambda: daemon.images.state("beta").ready, what="the second release to be installed")
    assert ImageMeta.read(image_dir / "beta.img").sha256 == second_sha
    # A pin the source does not serve: never a run on the old image, an error naming why.
    noop_map_path.write_text(file_image_map(source, image_dir, "0" * 64))
    assert await daemon.reload()
    await broker.open()
    job = await broker.submit(runs_on="beta")
    result = await broker.next_result()
    assert result.request_id == job.request_id and result.status is JobStatus.ERROR
    assert result.summary.startswith(
        f"image 'beta' is stale (sha256 changed: the map pins {'0' * 64}, the installed image is {second_sha})"
    )
    assert daemon.status()["images"]["beta"]["state"] == "stale (sha256 changed)"
