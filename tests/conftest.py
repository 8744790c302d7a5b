"""Shared fixtures: a real RabbitMQ (each test gets its own prefix and deletes its
exchanges and queues afterwards), noop image maps, and in-process daemons."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import pytest

from hypervisors.base import BackendName
from hypervisors.noop import NoopHypervisor
from orchestrator.core.config import DaemonSettings
from orchestrator.core.imagemap import ImageMap, load_image_map
from orchestrator.core.messages import JobRequest, JobResult
from orchestrator.core.topology import Topology, delete_topology, quorum_queue_arguments
from orchestrator.host.daemon import Daemon
from tests.support.amqpproxy import AmqpProxy

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
SHA = "0123456789abcdef0123456789abcdef01234567"

NOOP_MAP = """\
default_label: alpha-latest
aliases:
  alpha-latest: alpha
  a: alpha-latest
sizes:
  small: {cpus: 1, memory_mb: 256}
  big: {cpus: 64, memory_mb: 1024}
images:
  alpha:
    backend: noop
    local_path: /nonexistent/alpha.img
    size: small
    max_cpus: 8
  beta:
    backend: noop
    local_path: /nonexistent/beta.img
    size: small
"""


# --- libvirt (import libvirt only inside: tests marked `libvirt` alone may need it) ---

ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE = Path("/var/cache/orchestrator/test-image")
LIBVIRT_URI = "qemu:///system"
LIBVIRT_FIXTURES = frozenset({"test_image", "test_network"})  # every libvirt fixture uses one of them


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`-m "not libvirt"` must be a suite without libvirt: a test that needs it unmarked
    is a collection error."""
    unmarked = [
        item.nodeid
        for item in items
        if LIBVIRT_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("libvirt") is None
    ]
    if unmarked:
        raise pytest.UsageError(f"tests using libvirt fixtures without @pytest.mark.libvirt: {unmarked}")


@pytest.fixture(scope="session")
def test_image() -> Path:
    subprocess.run([sys.executable, str(ROOT / "examples" / "test-image" / "build.py"), str(TEST_IMAGE)], check=True)
    return TEST_IMAGE


def _network_xml(name: str) -> str:
    # Isolated: a bridge with no address and no forwarding, so guests reach nothing.
    bridge = "vb" + uuid.uuid4().hex[:10]
    return f"<network><name>{name}</name><bridge name='{bridge}' stp='off'/></network>"


@pytest.fixture(scope="session")
def test_network() -> Iterator[str]:
    import libvirt

    name = f"orch-test-{uuid.uuid4().hex[:8]}"
    conn = libvirt.open(LIBVIRT_URI)
    conn.networkDefineXML(_network_xml(name))
    conn.close()
    yield name
    conn = libvirt.open(LIBVIRT_URI)  # a fresh connection: a test may have restarted libvirtd
    network = conn.networkLookupByName(name)
    if network.isActive():
        network.destroy()
    network.undefine()
    conn.close()


# --- the broker and noop daemons ---


@pytest.fixture
def noop_map_path(tmp_path: Path) -> Path:
    path = tmp_path / "image-map.yaml"
    path.write_text(NOOP_MAP)
    return path


@pytest.fixture
def noop_map(noop_map_path: Path) -> ImageMap:
    return load_image_map(noop_map_path)


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def amqp_proxy() -> AsyncIterator[AmqpProxy]:
    """A proxy to the broker that a test can cut (see tests/support/amqpproxy.py)."""
    broker = urlsplit(AMQP_URL)
    proxy = await AmqpProxy((broker.hostname or "127.0.0.1", broker.port or 5672)).start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def amqp() -> AsyncIterator[aio_pika.abc.AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture
async def cleanup_topology(amqp, prefix: str) -> AsyncIterator[list[str]]:
    """Labels to delete queues for at the end of the test (tests append extra ones)."""
    labels: list[str] = ["alpha", "beta"]
    yield labels
    await asyncio.wait_for(amqp.connected.wait(), 60)  # a test may have restarted the broker
    channel = await amqp.channel()
    await delete_topology(channel, Topology(prefix), labels)
    await channel.close()


def make_settings(prefix: str, state_dir: Path, config: Path, **overrides: Any) -> DaemonSettings:
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "amqp_prefix": prefix,
        "config": config,
        "state_dir": state_dir,
        "backend": BackendName.NOOP,
        "host_cpus": 64,
        "host_memory_mb": 64 * 1024,
        "host_name": "test-host",
        "drain_timeout_s": 10,
        "heartbeat_s": 3600,
        "http_listen": "off",
    }
    values.update(overrides)
    return DaemonSettings.model_validate(values)


@pytest.fixture
async def daemon_factory(
    tmp_path: Path, prefix: str, noop_map_path: Path, cleanup_topology
) -> AsyncIterator[Callable[..., Any]]:
    daemons: list[Daemon] = []

    async def start(
        image_map: ImageMap | None = None, *, backend: NoopHypervisor | None = None, **overrides: Any
    ) -> Daemon:
        """A daemon on the noop backend (pass `backend` to keep a handle on it to measure)."""
        host = overrides.pop("host_name", f"host{len(daemons)}")
        config = overrides.pop("config", noop_map_path)
        settings = make_settings(prefix, tmp_path / host, config, host_name=host, **overrides)
        backends = {BackendName.NOOP: backend if backend is not None else NoopHypervisor()}
        daemon = Daemon(settings, image_map or load_image_map(noop_map_path), backends=backends)
        await daemon.start()
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        await daemon.stop()


class Broker:
    """Test-side client: publish requests, collect results and dead letters."""

    def __init__(self, connection: aio_pika.abc.AbstractRobustConnection, prefix: str, *, quorum_size: int = 3) -> None:
        self.connection = connection
        self.quorum_size = quorum_size  # as the daemons declare the results queue (QUORUM_SIZE)
        self.topology = Topology(prefix)
        self.results: asyncio.Queue[JobResult] = asyncio.Queue()
        self.channel: aio_pika.abc.AbstractChannel | None = None
        # Results are delivered at least once: a copy with the same message_id and body
        # (a host that died between the broker's confirm and its journal write) is
        # counted and dropped, as a forge integration would; a *different* second
        # result for a job is a conflict and fails `collect`.
        self.seen: dict[str, tuple[str | None, bytes]] = {}
        self.redeliveries = 0
        self.conflicts: list[str] = []

    async def open(self) -> None:
        self.channel = await self.connection.channel(publisher_confirms=True)
        # The durable results queue, as a forge integration reads it: results published
        # while this client's connection is down wait there.
        results = await self.channel.declare_exchange(self.topology.results, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await self.channel.declare_queue(
            self.topology.results_queue, durable=True, arguments=quorum_queue_arguments(self.quorum_size)
        )
        await queue.bind(results, routing_key="#")

        async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                result = JobResult.model_validate_json(message.body)
                job_id = str(result.request_id)
                if job_id in self.seen:
                    if self.seen[job_id] == (message.message_id, message.body):
                        self.redeliveries += 1
                    elif self.different_copy(job_id, self.seen[job_id], message.message_id, message.body):
                        earlier = JobResult.model_validate_json(self.seen[job_id][1])
                        self.conflicts.append(
                            f"{job_id}: {self.seen[job_id][0]} {earlier.status.value} exit {earlier.exit_code} on {earlier.host} "
                            f"({earlier.summary!r}), then {message.message_id} {result.status.value} exit {result.exit_code} "
                            f"on {result.host} ({result.summary!r})"
                        )
                    return
                self.seen[job_id] = (message.message_id, message.body)
                await self.results.put(result)

        await queue.consume(on_result)

    def different_copy(self, job_id: str, first: tuple[str | None, bytes], message_id: str | None, body: bytes) -> bool:
        """Whether a second result for a job, not byte-equal to the first, is a conflict."""
        return True

    async def publish_raw(self, body: bytes, routing_key: str, **headers: Any) -> None:
        assert self.channel is not None
        exchange = await self.channel.get_exchange(self.topology.jobs, ensure=False)
        await exchange.publish(
            aio_pika.Message(body=body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, headers=headers),
            routing_key=routing_key,
        )

    async def submit(self, routing_key: str | None = None, **fields: Any) -> JobRequest:
        fields.setdefault("request_id", str(uuid.uuid4()))
        fields.setdefault("repo_url", "https://example.invalid/repo.git")
        fields.setdefault("commit_sha", SHA)
        request = JobRequest.model_validate(fields)
        key = routing_key if routing_key is not None else (request.runs_on or "")
        await self.publish_raw(request.model_dump_json().encode(), key)
        return request

    async def next_result(self, timeout_s: float = 20) -> JobResult:
        try:
            return await asyncio.wait_for(self.results.get(), timeout=timeout_s)
        except TimeoutError:
            raise AssertionError(f"waited {timeout_s:g} s for a result, in vain") from None

    async def collect(self, count: int, timeout_s: float = 60) -> dict[str, JobResult]:
        got: dict[str, JobResult] = {}
        try:
            async with asyncio.timeout(timeout_s):
                while len(got) < count:
                    result = await self.results.get()
                    got[str(result.request_id)] = result
        except TimeoutError:
            raise AssertionError(f"waited {timeout_s:g} s for {count} results, got {len(got)}") from None
        assert not self.conflicts, self.conflicts
        return got

    async def dead_letters(self, count: int, timeout_s: float = 20) -> list[aio_pika.abc.AbstractIncomingMessage]:
        assert self.channel is not None
        queue = await self.channel.get_queue(self.topology.dlq, ensure=False)
        got = []
        async with asyncio.timeout(timeout_s):
            async with queue.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    got.append(message)
                    if len(got) == count:
                        break
        return got

    async def ready_count(self, label: str) -> int:
        assert self.channel is not None
        channel = await self.connection.channel()
        queue = await channel.declare_queue(self.topology.label_queue(label), passive=True)
        count = queue.declaration_result.message_count
        await channel.close()
        return count


@pytest.fixture
async def broker(amqp, prefix: str) -> AsyncIterator[Broker]:
    client = Broker(amqp, prefix)
    yield client
    if client.channel is not None:
        await client.channel.close()


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], *, what: str, timeout_s: float = 20, interval_s: float = 0.01
) -> None:
    """Poll a cheap predicate (plain or async) until it holds (tests never sleep and
    hope). Fails the test with an AssertionError naming `what` it waited for, and for
    how long, when `timeout_s` passes first."""

    async def holds() -> bool:
        outcome = predicate()
        return await outcome if inspect.isawaitable(outcome) else outcome

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await holds():
        if loop.time() >= deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}, in vain")
        await asyncio.sleep(interval_s)


def body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


@pytest.fixture(autouse=True)
async def no_daemon_process_outlives_its_test():
    from tests.support.daemonproc import DaemonProcess

    yield
    while DaemonProcess.started:
        daemon = DaemonProcess.started.pop()
        if daemon.process is not None and daemon.process.returncode is None:
            await daemon.kill()
