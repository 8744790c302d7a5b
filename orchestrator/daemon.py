"""`orchestrator run`: wires broker, journal, capacity, consumers, runner and backends.

Start-up declares the topology, publishes results left in the outbox, then starts the
consumers. Shutdown (SIGINT/SIGTERM) stops consuming first, lets running jobs finish for
up to `drain_timeout_s`, then shuts their VMs down and hands the jobs back to the broker.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping

from aiohttp import web

from hypervisors.base import BackendName, Hypervisor
from hypervisors.router import RouterHypervisor
from orchestrator import __version__
from orchestrator.amqp import ConfirmedPublisher, EventPublisher, connect
from orchestrator.capacity import CapacityLedger
from orchestrator.config import DaemonSettings
from orchestrator.consumer import Settler
from orchestrator.control import CancelRegistry, ControlListener
from orchestrator.httpapi import start_http
from orchestrator.imagemap import ImageEntry, ImageMap
from orchestrator.images import ImagePreparer
from orchestrator.intake import JobIntake
from orchestrator.journal import Journal
from orchestrator.logsetup import EventLogger
from orchestrator.messages import Heartbeat
from orchestrator.outbox import ResultOutbox
from orchestrator.reconcile import Reconciliation, reconcile
from orchestrator.runner import JobRunner, StopReason
from orchestrator.scheduler import Scheduler
from orchestrator.topology import Topology, declare_topology

log = EventLogger("orchestrator.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message is one line: what failed and how to fix it."""


def backends_needed(settings: DaemonSettings, image_map: ImageMap) -> set[BackendName]:
    return {settings.backend} | {image.backend for image in image_map.images.values() if image.backend}


async def build_backends(settings: DaemonSettings, needed: set[BackendName]) -> dict[BackendName, Hypervisor]:
    backends: dict[BackendName, Hypervisor] = {}
    for name in needed:
        if name is BackendName.NOOP:
            from hypervisors.noop import NoopHypervisor

            backends[name] = NoopHypervisor()
        elif name is BackendName.LIBVIRT:
            from hypervisors.libvirt import LibvirtHypervisor

            backends[name] = await LibvirtHypervisor.connect(
                uri=settings.libvirt_uri,
                network=settings.libvirt_network,
                domain_type=settings.libvirt_domain_type,
                state_dir=settings.state_dir,
                orchestrator_id=settings.orchestrator_id,
            )
        elif name is BackendName.ZONES:
            from hypervisors.zones import ZonesHypervisor

            backends[name] = ZonesHypervisor(
                state_dir=settings.state_dir,
                orchestrator_id=settings.orchestrator_id,
                dataset=settings.zones_dataset,
                zonepath_root=settings.zones_zonepath_root,
                global_nic=settings.zones_global_nic,
            )
    return backends


class Daemon:
    def __init__(
        self,
        settings: DaemonSettings,
        image_map: ImageMap,
        *,
        backends: Mapping[BackendName, Hypervisor] | None = None,
    ) -> None:
        self.settings = settings
        self.image_map = image_map
        self.topology = Topology(settings.amqp_prefix)
        self._given_backends = backends
        self.ledger = CapacityLedger(
            max_concurrency=settings.max_concurrency,
            per_label=settings.capacity_map,
            cpus=settings.host_cpus,
            memory_mb=settings.host_memory_mb,
        )
        self.router: RouterHypervisor | None = None
        self.journal: Journal | None = None
        self.runner: JobRunner | None = None
        self.scheduler: Scheduler | None = None
        self.outbox: ResultOutbox | None = None
        self._connection = None
        self._events: EventPublisher | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._image_task: asyncio.Task[None] | None = None
        self.images: ImagePreparer | None = None
        self.reconciliation: Reconciliation | None = None
        self._http: web.AppRunner | None = None
        self.control: ControlListener | None = None
        self.cancels: CancelRegistry | None = None
        self._stopping = False

    def _backend_of(self, image: ImageEntry) -> str:
        assert self.router is not None
        return self.router.backend_for(image.backend).name.value

    async def start(self) -> None:
        s = self.settings
        for sub in ("logs", "overlays", "seeds"):
            (s.state_dir / sub).mkdir(parents=True, exist_ok=True)
        backends = dict(self._given_backends) if self._given_backends is not None else await build_backends(
            s, backends_needed(s, self.image_map)
        )
        self.router = RouterHypervisor(backends, s.backend)
        self.images = ImagePreparer(self.image_map, image_dir=s.images_dir, max_image_bytes=s.max_image_bytes)
        self.journal = Journal(s.state_dir / "state.db")
        self._connection = await connect(s.amqp_url, name=f"orchestrator@{s.host_name}")
        setup = await self._connection.channel()
        await declare_topology(setup, self.topology, self.image_map, delivery_limit=s.delivery_limit)
        await setup.close()
        self._publisher = await ConfirmedPublisher.open(self._connection)
        self._events = await EventPublisher.open(self._connection, self.topology.events)
        self.outbox = ResultOutbox(self.journal, self._publisher, self.topology)
        self.outbox.start()
        self.runner = JobRunner(
            settings=s,
            router=self.router,
            journal=self.journal,
            outbox=self.outbox,
            publisher=self._publisher,
            topology=self.topology,
            ledger=self.ledger,
            images=self.images,
            emit=self._events.emit,
        )
        self.cancels = CancelRegistry(self.journal)
        await self.cancels.load()
        intake = JobIntake(
            image_map=self.image_map,
            ledger=self.ledger,
            journal=self.journal,
            outbox=self.outbox,
            publisher=self._publisher,
            topology=self.topology,
            host=s.host_name,
            backend_of=self._backend_of,
            start_job=self.runner.start,
            cancelled=self.cancels,
        )
        self.scheduler = Scheduler(
            image_map=self.image_map,
            ledger=self.ledger,
            intake=intake,
            settler=Settler(self._publisher, self.topology),
            topology=self.topology,
        )
        self.reconciliation = await reconcile(
            settings=s, image_map=self.image_map, journal=self.journal, router=self.router,
            runner=self.runner, ledger=self.ledger, outbox=self.outbox,
        )
        self.control = ControlListener(
            topology=self.topology, host=s.host_name, journal=self.journal, runner=self.runner,
            cancels=self.cancels, describe=self.heartbeat,
        )
        await self.control.start(self._connection)
        await self.scheduler.start(self._connection)
        self._heartbeat_task = asyncio.create_task(self._heartbeat(), name="heartbeat")
        self._image_task = asyncio.create_task(self._prepare_images(), name="prepare-images")
        if s.http_listen != "off":
            address, _, port = s.http_listen.rpartition(":")
            self._http = await start_http(self, address, int(port))
        log.info(
            "daemon.started", host=s.host_name, version=__version__, prefix=s.amqp_prefix,
            labels=sorted(self.image_map.images), max_concurrency=s.max_concurrency,
            backends=sorted(b.value for b in backends),
        )

    async def _prepare_images(self) -> None:
        """Fetch every missing image this host serves, in the background: jobs for
        ready images start at once, jobs for these wait for their image."""
        assert self.images is not None
        for label, image in self.image_map.images.items():
            if image.source is None or image.local_path.exists():
                continue
            try:
                await self.images.prepare(label)
            except Exception as exc:  # logged by the preparer; a job for it gets an error result
                log.warning("image.prepare_at_start_failed", label=label, error=str(exc))

    @property
    def broker_connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    def status(self) -> dict[str, object]:
        """What `/status` shows: capacity, running jobs, image preparation."""
        images = {}
        if self.images is not None:
            for label, st in self.images.status().items():
                images[label] = {
                    "state": st.state.value, "bytes_in": st.bytes_in, "bytes_total": st.bytes_total,
                    "percent": round(100 * st.fraction, 1) if st.fraction is not None else None, "error": st.error,
                }
        return {
            **self.heartbeat().model_dump(mode="json"),
            "broker": "connected" if self.broker_connected else "disconnected",
            "jobs": sorted(self.runner.running) if self.runner is not None else [],
            "images": images,
        }

    def heartbeat(self) -> Heartbeat:
        ledger = self.ledger
        return Heartbeat(
            host=self.settings.host_name,
            version=__version__,
            labels=sorted(label for label in self.image_map.images if ledger.label_limit(label) > 0),
            max_concurrency=ledger.max_concurrency,
            running=ledger.running,
            running_by_label=ledger.running_by_label(),
            cpus_used=ledger.cpus_used,
            cpus_total=ledger.cpus_total,
            memory_mb_used=ledger.memory_mb_used,
            memory_mb_total=ledger.memory_mb_total,
            draining=ledger.draining,
        )

    async def _heartbeat(self) -> None:
        assert self._events is not None
        while True:
            await self._events.emit(f"host.heartbeat.{self.settings.host_name}", self.heartbeat())
            await asyncio.sleep(self.settings.heartbeat_s)

    async def stop(self) -> None:
        """Graceful: stop intake, drain, then shut down what is still running."""
        if self._stopping:
            return
        self._stopping = True
        s = self.settings
        log.info("daemon.stopping", host=s.host_name, running=self.ledger.running, drain_timeout_s=s.drain_timeout_s)
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.control is not None:
            await self.control.stop()
        if self.runner is not None:
            if not await self.runner.wait_idle(s.drain_timeout_s):
                for job_id in list(self.runner.running):
                    self.runner.stop_job(job_id, StopReason.SHUTDOWN)
                await self.runner.wait_idle(s.shutdown_timeout_s + 30)
        for task in (self._heartbeat_task, self._image_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.images is not None:
            await self.images.close()
        if self.outbox is not None:
            await self.outbox.stop()
            await self.outbox.flush()
        if self._http is not None:
            await self._http.cleanup()
        if self._connection is not None:
            await self._connection.close()
        if self.router is not None:
            await self.router.close()
        if self.journal is not None:
            await self.journal.close()
        log.info("daemon.stopped", host=s.host_name)


async def run_daemon(settings: DaemonSettings, image_map: ImageMap) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    daemon = Daemon(settings, image_map)
    await daemon.start()
    try:
        await stop.wait()
    finally:
        await daemon.stop()
