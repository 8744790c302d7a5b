"""Drop-in for the reference orchestrator: each setting its documentation names is
honoured (mapped onto this project's topology) or refused with one line; none is
ignored. Against the real broker, a request published exactly as the reference
integration publishes it (its exchange, its routing key, its fields) gets its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest

from hypervisors.base import BackendName
from hypervisors.noop import NoopHypervisor
from orchestrator.core.config import SettingsError, load_settings
from orchestrator.core.imagemap import load_image_map
from orchestrator.core.messages import JobStatus
from orchestrator.host.daemon import Daemon
from tests.conftest import AMQP_URL, SHA, Broker

ROOT = Path(__file__).resolve().parents[2]
BASE = {"HOST_CPUS": "8", "HOST_MEMORY_MB": "8192", "HTTP_LISTEN": "off", "HEARTBEAT_S": "3600", "ORCH_BACKEND": "noop"}


def reference_request(runs_on: str = "alpha") -> dict[str, object]:
    """A request with the reference's fields only (its `jobrequest.v1`)."""
    return {
        "schema_version": "jobrequest.v1",
        "request_id": str(uuid.uuid4()),
        "source": "github",
        "repo_url": "https://example.invalid/org/project.git",
        "commit_sha": SHA,
        "runs_on": runs_on,
        "workflow_path": ".solstice/workflow.kdl",
        "workflow_job_id": "build",
        "repo_owner": "org",
        "repo_name": "project",
        "script_path": ".solstice/job.sh",
        "submitted_at": "2026-12-07T12:00:00Z",
    }


# --- each setting alone, and as a reference environment file has them -----------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"AMQP_URL": "amqp://u:p@broker:5672/"}, {"amqp_url": "amqp://u:p@broker:5672/"}),
        ({"MAX_CONCURRENCY": "4"}, {"max_concurrency": 4}),
        (
            {"CAPACITY_MAP": "illumos-latest=2,ubuntu-22.04=4"},
            {"capacity_map": {"illumos-latest": 2, "ubuntu-22.04": 4}},
        ),
        ({"ORCH_CONFIG": "/etc/orchestrator/map.yaml"}, {"config": Path("/etc/orchestrator/map.yaml")}),
        (
            {"LIBVIRT_URI": "qemu:///session", "LIBVIRT_NETWORK": "ci"},
            {"libvirt_uri": "qemu:///session", "libvirt_network": "ci"},
        ),
        ({"AMQP_EXCHANGE": "solstice.jobs"}, {"amqp_prefix": "ci", "amqp_exchange": "solstice.jobs"}),
        (
            {"AMQP_EXCHANGE": "solstice.jobs", "AMQP_PREFIX": "solstice"},
            {"amqp_prefix": "solstice", "amqp_exchange": None},
        ),
        ({"AMQP_QUEUE": "solstice.jobs.v1"}, {"amqp_queue": "solstice.jobs.v1", "amqp_routing_key": "jobrequest.v1"}),
        ({"AMQP_ROUTING_KEY": "jobs.v2"}, {"amqp_routing_key": "jobs.v2"}),
        ({"AMQP_PREFETCH": "2"}, {"amqp_prefetch": 2}),
        (
            {
                "AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
                "AMQP_EXCHANGE": "solstice.jobs",
                "AMQP_QUEUE": "solstice.jobs.v1",
                "AMQP_ROUTING_KEY": "jobrequest.v1",
                "AMQP_PREFETCH": "2",
                "MAX_CONCURRENCY": "2",
                "CAPACITY_MAP": "illumos-latest=2",
                "ORCH_CONFIG": "examples/orchestrator-image-map.yaml",
            },
            {
                "amqp_prefix": "ci",
                "amqp_exchange": "solstice.jobs",
                "amqp_queue": "solstice.jobs.v1",
                "amqp_prefetch": 2,
                "max_concurrency": 2,
                "capacity_map": {"illumos-latest": 2},
            },
        ),
    ],
    ids=[
        "AMQP_URL",
        "MAX_CONCURRENCY",
        "CAPACITY_MAP",
        "ORCH_CONFIG",
        "LIBVIRT",
        "AMQP_EXCHANGE",
        "AMQP_EXCHANGE-ours",
        "AMQP_QUEUE",
        "AMQP_ROUTING_KEY",
        "AMQP_PREFETCH",
        "reference-env-file",
    ],
)
def test_each_reference_setting_is_honoured(environ, expected):
    settings = load_settings({}, environ)
    assert {name: getattr(settings, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"AMQP_EXCHANGE": "ci.results"}, "AMQP_EXCHANGE=ci.results is one of this fleet's own exchanges"),
        ({"AMQP_QUEUE": "ci.results"}, "AMQP_QUEUE=ci.results is one of this fleet's own queues"),
        ({"AMQP_PREFETCH": "0"}, "--amqp-prefetch / AMQP_PREFETCH: Input should be greater than or equal to 1"),
        ({"AMQP_EXCHANGE": "has space"}, "--amqp-exchange / AMQP_EXCHANGE: String should match pattern"),
    ],
    ids=["exchange-of-ours", "queue-of-ours", "prefetch-0", "exchange-name"],
)
def test_a_reference_setting_that_cannot_be_honoured_is_refused_with_one_line(environ, says):
    with pytest.raises(SettingsError) as refused:
        load_settings({}, environ)
    assert str(refused.value).startswith(says) and "\n" not in str(refused.value)


def test_config_check_says_what_each_reference_setting_became(noop_map_path):
    env = {
        **os.environ,
        "ORCH_CONFIG": str(noop_map_path),
        "AMQP_EXCHANGE": "solstice.jobs",
        "AMQP_QUEUE": "solstice.jobs.v1",
        "AMQP_ROUTING_KEY": "jobrequest.v1",
        "AMQP_PREFETCH": "2",
    }
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator", "config", "check"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    said = [line for line in out.splitlines() if line.startswith("reference setting ")]
    assert said == [
        f"reference setting ORCH_CONFIG={noop_map_path}: the same setting here: the image map",
        "reference setting AMQP_EXCHANGE=solstice.jobs: the exchange AMQP_QUEUE solstice.jobs.v1 is bound to (key jobrequest.v1)",
        "reference setting AMQP_QUEUE=solstice.jobs.v1: consumed as an ingress: each request re-published to ci.jobs "
        "with its runs_on (or the default label)",
        "reference setting AMQP_ROUTING_KEY=jobrequest.v1: the key of the ingress binding",
        "reference setting AMQP_PREFETCH=2: not applied: each host's window sets its consumers' prefetch from what it can "
        "start now (MAX_CONCURRENCY, CAPACITY_MAP, CPU and memory); a fixed prefetch would let the broker send more than fits "
        "(read as 2)",
    ]
    assert '"amqp_prefix": "ci"' in out


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        (
            {"AMQP_QUEUE": "{prefix}.jobs.alpha"},
            "error: AMQP_QUEUE={prefix}.jobs.alpha is the queue of label alpha: name the queue the reference integration's "
            "requests wait in, or drop AMQP_QUEUE",
        ),
        (
            {"AMQP_EXCHANGE": "{prefix}.events"},
            "error: AMQP_EXCHANGE={prefix}.events is one of this fleet's own exchanges: name the exchange the reference "
            "integration publishes its requests to (the reference's AMQP_EXCHANGE), or drop AMQP_EXCHANGE",
        ),
    ],
    ids=["queue-of-a-label", "exchange-of-ours"],
)
def test_the_daemon_refuses_a_reference_setting_it_cannot_honour_in_one_line(noop_map_path, prefix, environ, says):
    env = {
        **os.environ,
        **BASE,
        "AMQP_URL": AMQP_URL,
        "ORCH_CONFIG": str(noop_map_path),
        "AMQP_PREFIX": prefix,
        **{name: value.format(prefix=prefix) for name, value in environ.items()},
    }
    run = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == says.format(prefix=prefix)  # after the log lines of the start
    assert "Traceback" not in run.stderr


# --- the reference integration's requests reach the fleet -------------------------------------


async def start_daemon(environ: dict[str, str], map_path: Path, state: Path) -> Daemon:
    settings = load_settings(
        {},
        {
            **BASE,
            "AMQP_URL": AMQP_URL,
            "ORCH_CONFIG": str(map_path),
            "STATE_DIR": str(state),
            "HOST_NAME": "ref",
            **environ,
        },
    )
    daemon = Daemon(settings, load_image_map(map_path), backends={BackendName.NOOP: NoopHypervisor()})
    await daemon.start()
    return daemon


async def publish_as_the_reference(amqp, exchange: str, routing_key: str, request: dict[str, object]) -> None:
    channel = await amqp.channel(publisher_confirms=True)
    try:
        target = await channel.get_exchange(exchange, ensure=False)
        await target.publish(
            aio_pika.Message(
                json.dumps(request).encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                content_type="application/json",
            ),
            routing_key=routing_key,
        )
    finally:
        await channel.close()


async def drop(amqp, *, queues: list[str] = (), exchanges: list[str] = ()) -> None:
    channel = await amqp.channel()
    for queue in queues:
        await channel.queue_delete(queue)
    for exchange in exchanges:
        await channel.exchange_delete(exchange)
    await channel.close()


@pytest.mark.parametrize("case", ["reference-env-file", "exchange-only", "our-own-exchange"])
async def test_a_request_published_as_the_reference_integration_does_gets_its_result(
    case, prefix, tmp_path, noop_map_path, cleanup_topology, amqp
):
    # The reference integration publishes to its exchange with `jobrequest.v1`.
    reference_exchange = f"{prefix}.jobs" if case == "our-own-exchange" else f"{prefix}-ref.jobs"
    environ = {"AMQP_PREFIX": prefix, "AMQP_EXCHANGE": reference_exchange}
    if case == "reference-env-file":
        environ |= {
            "AMQP_QUEUE": f"{prefix}-ref.jobs.v1",
            "AMQP_ROUTING_KEY": "jobrequest.v1",
            "AMQP_PREFETCH": "2",
            "MAX_CONCURRENCY": "2",
        }
    daemon = await start_daemon(environ, noop_map_path, tmp_path / "state")
    broker = Broker(amqp, prefix)
    try:
        await broker.open()
        request = reference_request()
        await publish_as_the_reference(amqp, reference_exchange, "jobrequest.v1", request)
        result = await broker.next_result()
        assert str(result.request_id) == request["request_id"]
        assert result.status is JobStatus.SUCCEEDED and result.label == "alpha" and result.host == "ref"
        if case == "reference-env-file":  # nothing is left where the reference integration's requests wait
            channel = await amqp.channel()
            left = await channel.declare_queue(f"{prefix}-ref.jobs.v1", passive=True)
            assert left.declaration_result.message_count == 0
            await channel.close()
    finally:
        await daemon.stop()
        if broker.channel is not None:
            await broker.channel.close()
        await drop(amqp, queues=[f"{prefix}-ref.jobs.v1"], exchanges=[f"{prefix}-ref.jobs"])


async def test_a_reference_fleets_exchange_and_queue_are_used_as_they_are(
    prefix, tmp_path, noop_map_path, cleanup_topology, amqp
):
    # A running reference fleet declared its exchange (no alternate exchange: ours could
    # not be declared over it) and a classic queue bound with `jobrequest.v1`; requests
    # already wait in it when this fleet starts.
    reference_exchange, reference_queue = f"{prefix}-ref.jobs", f"{prefix}-ref.jobs.v1"
    channel = await amqp.channel()
    await channel.declare_exchange(reference_exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    queue = await channel.declare_queue(reference_queue, durable=True)
    await queue.bind(reference_exchange, routing_key="jobrequest.v1")
    await channel.close()
    requests = [reference_request(runs_on=label) for label in ("alpha", "beta", "nonexistent")]
    for request in requests:
        await publish_as_the_reference(amqp, reference_exchange, "jobrequest.v1", request)
    broker = Broker(amqp, prefix)
    await broker.open()
    daemon = await start_daemon(
        {"AMQP_PREFIX": prefix, "AMQP_EXCHANGE": reference_exchange, "AMQP_QUEUE": reference_queue},
        noop_map_path,
        tmp_path / "state",
    )
    try:
        results = await broker.collect(3)
        assert {str(r.request_id): r.status for r in results.values()} == {
            requests[0]["request_id"]: JobStatus.SUCCEEDED,
            requests[1]["request_id"]: JobStatus.SUCCEEDED,
            requests[2]["request_id"]: JobStatus.ERROR,
        }
        assert "nonexistent" in results[requests[2]["request_id"]].summary
    finally:
        await daemon.stop()
        await broker.channel.close()
        await drop(amqp, queues=[reference_queue], exchanges=[reference_exchange])
