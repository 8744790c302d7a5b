"""`orchestrator run`: wires broker, journal, capacity, consumers, runner and backends.

Start-up opens each part in order and pushes its shutdown onto one `AsyncExitStack`, so
a failed start closes exactly what was opened, in reverse, and `stop()` is that same
path. The order makes shutdown graceful: consumers stop first (queued work stays in the
broker), running jobs get `drain_timeout_s` to finish while results, heartbeats, cancels
and the HTTP API keep working, then their VMs are shut down and the jobs handed back.

`SIGHUP` re-reads the image map (`reload`): a bad map is refused and the old one stays.
"""

from __future__ import annotations

import asyncio
import faulthandler
import functools
import signal
import time
from collections.abc import Coroutine, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from hypervisors.base import BackendName, Hypervisor
from hypervisors.router import RouterHypervisor
from hypervisors.statedir import restrict_umask
from orchestrator import __version__
from orchestrator.core.amqp import (
    ConfirmedPublisher,
    EventPublisher,
    FailoverConnection,
    connect_with_retry,
    describe_error,
    wait_uncancelled,
)
from orchestrator.core.config import DaemonSettings
from orchestrator.core.fdlimit import raise_open_files_limit
from orchestrator.core.fleet import Fleet, FleetUnavailable
from orchestrator.core.httpserver import HttpLimits
from orchestrator.core.imagemap import ImageEntry, ImageMap, ImageMapError, Resources, load_image_map
from orchestrator.core.images import ImagePreparer
from orchestrator.core.lifecycle import (
    CLOSE_STEP_TIMEOUT_S,
    BackgroundTasks,
    StartupError,
    bounded,
    failing_as,
)
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import Heartbeat, JobDetail, JobHolding, JobLocation, JobsQuery, JobSummary
from orchestrator.core.metrics import DaemonMetrics, measure_loop_lag
from orchestrator.core.topology import Topology, declare_topology
from orchestrator.host.capacity import CapacityLedger
from orchestrator.host.consumer import RequeueReason, Settler
from orchestrator.host.control import CancelRegistry, ControlListener
from orchestrator.host.deadletters import DeadLetterAnswerer
from orchestrator.host.ingress import ReferenceIngress
from orchestrator.host.intake import REDELIVERY_CHECK_S, AcceptedJob, JobIntake
from orchestrator.host.jobview import detail_of, summary_of
from orchestrator.host.journal import JobState, Journal
from orchestrator.host.outbox import ResultOutbox
from orchestrator.host.reconcile import reconcile
from orchestrator.host.retention import directory_bytes, sweep
from orchestrator.host.runner import JobRunner, StopReason
from orchestrator.host.scheduler import Scheduler
from orchestrator.host.warmpool import WarmPools
from orchestrator.host.window import HostWindow
from orchestrator.web.app import start_http
from orchestrator.web.hostview import MetricsSnapshot

log = EventLogger("orchestrator.host.daemon")

DRAINING_FLAG = "draining"
# Jobs accepted this long before the broker connection was lost may have lost their
# ack with it (an ack is a frame on the socket, never confirmed): once connected again,
# the host asks the fleet whether another host was given them.
ACK_DOUBT_S = 10.0
HOUSEKEEPING_SWEEP_S = 3600.0
HOUSEKEEPING_MEASURE_S = 60.0


def backends_needed(settings: DaemonSettings, image_map: ImageMap) -> dict[BackendName, list[str]]:
    """Each backend some image uses, with those images' labels: `ORCH_BACKEND` only fills
    in images that name none, so a backend no image uses is never built."""
    needed: dict[BackendName, list[str]] = {}
    for label, image in sorted(image_map.images.items()):
        needed.setdefault(image.backend or settings.backend, []).append(label)
    return needed


async def build_backend(settings: DaemonSettings, name: BackendName, labels: list[str]) -> Hypervisor:
    """Connect one backend; `StartupError` naming what is missing when it cannot."""
    with failing_as(f"backend {name.value} (images {', '.join(labels)})"):
        if name is BackendName.NOOP:
            from hypervisors.noop import NoopHypervisor

            return NoopHypervisor()
        if name is BackendName.ZONES:
            from hypervisors.zones import ZonesHypervisor

            return ZonesHypervisor(
                state_dir=settings.state_dir,
                orchestrator_id=settings.orchestrator_id,
                dataset=settings.zones_dataset,
                zonepath_root=settings.zones_zonepath_root,
                global_nic=settings.zones_global_nic,
            )
        try:
            from hypervisors.libvirt.backend import LibvirtHypervisor
        except ImportError:
            raise StartupError(
                f"images {', '.join(labels)} use the libvirt backend, but libvirt-python is not installed "
                "(pip install '.[libvirt]' or Debian's python3-libvirt; or give those images another backend)"
            ) from None
        return await LibvirtHypervisor.connect(
            uri=settings.libvirt_uri,
            network=settings.libvirt_network,
            domain_type=settings.libvirt_domain_type,
            state_dir=settings.state_dir,
            orchestrator_id=settings.orchestrator_id,
        )


def _refuse_reference_conflicts(image_map: ImageMap, settings: DaemonSettings) -> None:
    """AMQP_QUEUE naming a label queue would take that label's jobs off its consumers."""
    topology = Topology(settings.amqp_prefix)
    for label in image_map.images:
        if settings.amqp_queue == topology.label_queue(label):
            raise StartupError(
                f"AMQP_QUEUE={settings.amqp_queue} is the queue of label {label}: name the queue the reference "
                "integration's requests wait in, or drop AMQP_QUEUE"
            )


def _refuse_map_problems(image_map: ImageMap, settings: DaemonSettings) -> None:
    problems = image_map.path_problems(image_dir=settings.images_dir, default_backend=settings.backend)
    problems += image_map.backend_problems(default_backend=settings.backend)
    if problems:
        more = f" (and {len(problems) - 1} more: orchestrator config check lists them)" if len(problems) > 1 else ""
        raise StartupError(problems[0] + more)


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
        self.images: ImagePreparer | None = None
        self._intake: JobIntake | None = None
        self.pools: WarmPools | None = None
        self._connection: FailoverConnection | None = None
        self._events: EventPublisher | None = None
        self._publisher: ConfirmedPublisher | None = None
        self._stack = AsyncExitStack()
        self._reload_lock = asyncio.Lock()
        self._started = asyncio.Event()
        self._preparations = BackgroundTasks()  # image preparations at start and after reloads
        self._state_dir_bytes: int | None = None
        self._dlq_messages: int | None = None
        self._stopped = False
        self._broker_lost_at: float | None = None  # wall clock, while the connection is down
        self._ack_checks = BackgroundTasks()
        # Histograms and gauges recorded as things happen (/metrics serves them beside
        # the numbers it reads at scrape time); this daemon's own, never a global.
        self.meters = DaemonMetrics(CollectorRegistry())
        self.meters.draining.set_function(lambda: float(self.ledger.draining))
        # The broker window: claims for what the consumers may be sent, held deliveries.
        self.window = HostWindow(self.ledger, self._default_size, max_hold_s=settings.max_hold_s)
        self.meters.held.set_function(lambda: float(self.window.held))
        self.meters.claimed.set_function(lambda: float(self.ledger.claimed))
        self.meters.count_reasons([reason.value for reason in RequeueReason])
        # The dashboard's view of every host (this one's heartbeat is read live).
        self.fleet = Fleet(
            topology=self.topology, host=settings.host_name, heartbeat_s=settings.heartbeat_s, own=self.heartbeat
        )

    # --- HostView (what the HTTP API reads) ---------------------------------------------
    @property
    def host_name(self) -> str:
        return self.settings.host_name

    @property
    def broker_connected(self) -> bool:
        connection = self._connection
        return connection is not None and not connection.is_closed and connection.connected.is_set()

    @property
    def broker_node(self) -> str | None:
        """`host:port` of the broker node this host is connected to; None while it is not."""
        return self._connection.node if self._connection is not None else None

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        if not self.broker_connected:
            reasons.append("broker connection is down (reconnecting)")
        if self.ledger.draining:
            reasons.append("host is draining")
        return reasons

    def job_running(self, job_id: str) -> bool:
        # The ledger holds a job from its acceptance on, a moment before the runner
        # registers it: a log asked for in between has one to come, not a 404.
        return self.ledger.holds_job(job_id) or (self.runner is not None and job_id in self.runner.running)

    def console_path(self, job_id: str) -> Path:
        return self.settings.state.console(job_id)

    # --- what operators ask (HTTP API and the control exchange) ------------------------------
    async def set_draining(self, draining: bool) -> Heartbeat:
        """Drain: stop taking work (consumers cancelled, queued jobs stay in the broker for
        other hosts), let running jobs finish, destroy idle pool VMs; resume: take work
        again. Journaled, so a restarted daemon keeps draining."""
        assert self.journal is not None
        await self.journal.set_host_flag(DRAINING_FLAG, on=draining)
        if draining != self.ledger.draining:
            self.ledger.set_draining(draining=draining)
            log.info(
                "host.draining" if draining else "host.resumed",
                host=self.settings.host_name,
                running=self.ledger.running,
            )
        return self.heartbeat()

    async def jobs(self, query: JobsQuery) -> list[JobSummary]:
        assert self.journal is not None
        records = await self.journal.recent(
            state=JobState(query.state) if query.state else None,
            label=query.label,
            since=query.since.timestamp() if query.since else None,
            limit=query.limit,
        )
        return [summary_of(record, host=self.settings.host_name) for record in records]

    async def job(self, job_id: str) -> JobDetail | None:
        assert self.journal is not None
        record = await self.journal.get(job_id)
        return detail_of(record, host=self.settings.host_name) if record is not None else None

    async def locate(self, job_id: str) -> JobLocation | None:
        """Where a job's log is, when this host ran (or runs) the job: None otherwise."""
        running = self.job_running(job_id)
        if not running and not await asyncio.to_thread(self.console_path(job_id).is_file):
            return None  # not here, or answered here without running
        public = self.settings.public_url
        return JobLocation(
            request_id=job_id,
            host=self.settings.host_name,
            running=running,
            log_url=f"{public}/jobs/{job_id}/log" if public else None,
        )

    async def holding(self, job_id: str) -> JobHolding | None:
        """What this host's journal has of a job (`holder`), or that it is checking a
        redelivery of it with the fleet; None when it has nothing of it (a job it left
        to another host included)."""
        assert self.journal is not None
        record = await self.journal.get(job_id)
        if record is not None and record.state is not JobState.SUPERSEDED:  # another host's, not this one's
            return JobHolding(
                request_id=job_id, host=self.settings.host_name, attempt=record.attempt, state=record.state.value
            )
        attempt = self._intake.checking.get(job_id) if self._intake is not None else None
        if attempt is not None:
            return JobHolding(request_id=job_id, host=self.settings.host_name, attempt=attempt, state="checking")
        return None

    def metrics(self) -> MetricsSnapshot:
        return MetricsSnapshot(
            running_by_label={label: self.ledger.running_for(label) for label in self.image_map.images},
            max_concurrency=self.ledger.max_concurrency,
            cpus_used=self.ledger.cpus_used,
            memory_mb_used=self.ledger.memory_mb_used,
            broker_connected=self.broker_connected,
            finished_by_status=dict(self.runner.finished) if self.runner is not None else {},
            results_published=self.outbox.published if self.outbox is not None else 0,
            state_dir_bytes=self._state_dir_bytes,
            dlq_messages=self._dlq_messages,
            warm_vms={
                (label, state): n
                for label, counts in (self.pools.counts() if self.pools else {}).items()
                for state, n in counts.items()
            },
            warm_failed=self.pools.failed_total() if self.pools else {},
            warm_taken=self.pools.taken_total() if self.pools else {},
            warm_fallbacks=self.runner.warm_fallbacks if self.runner is not None else 0,
            warm_wanted=self.pools.wanted() if self.pools is not None else {},
        )

    def status(self) -> dict[str, object]:
        """What `/status` shows: capacity, running jobs, image preparation."""
        images = {}
        if self.images is not None:
            progress = self.images.status()
            for label, image in sorted(self.image_map.images.items()):
                if image.source is None:
                    continue  # the operator's own file: nothing to prepare
                st, state = progress.get(label), self.images.state(label)
                images[label] = {
                    "state": state.summary,
                    "detail": str(state),
                    "bytes_in": st.bytes_in if st else 0,
                    "bytes_total": st.bytes_total if st else None,
                    "percent": round(100 * st.fraction, 1) if st and st.fraction is not None else None,
                    "error": st.error if st else None,
                }
        return {
            **self.heartbeat().model_dump(mode="json"),
            "broker": "connected" if self.broker_connected else "disconnected",
            "jobs": sorted(self.runner.running) if self.runner is not None else [],
            "images": images,
            "warm": self.pools.status() if self.pools is not None else {},
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
            broker_node=self.broker_node,
            draining=ledger.draining,
            warm=ledger.warm,
            warm_by_label=ledger.warm_by_label(),
            public_url=self.settings.public_url,
        )

    # --- start and stop ----------------------------------------------------------------------
    async def start(self) -> None:
        """Open everything; on any failure close what was opened and raise (a
        `StartupError` for what an operator can fix)."""
        try:
            await self._open(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise
        self._started.set()
        log.info(
            "daemon.started",
            host=self.settings.host_name,
            version=__version__,
            prefix=self.settings.amqp_prefix,
            labels=sorted(self.image_map.images),
            max_concurrency=self.settings.max_concurrency,
            backends=sorted(b.value for b in self._router.backends),
        )

    async def stop(self) -> None:
        """Graceful: stop intake, drain, then shut down what is still running. (A start
        that failed has already closed what it opened.)"""
        if self._stopped or not self._started.is_set():
            return
        self._stopped = True
        log.info(
            "daemon.stopping",
            host=self.settings.host_name,
            running=self.ledger.running,
            drain_timeout_s=self.settings.drain_timeout_s,
        )
        await self._stack.aclose()
        log.info("daemon.stopped", host=self.settings.host_name)

    @property
    def _router(self) -> RouterHypervisor:
        assert self.router is not None, "the daemon has not started"
        return self.router

    async def _open(self, stack: AsyncExitStack) -> None:
        s = self.settings
        with failing_as(
            f"cannot use STATE_DIR {s.state_dir}", "make it a directory this user can write, or set STATE_DIR"
        ):
            await asyncio.to_thread(s.state.create)
            self.journal = Journal(s.state.journal)
        stack.push_async_callback(self.journal.close)
        with failing_as(f"cannot read the journal {s.state.journal}"):
            if await self.journal.host_flag(DRAINING_FLAG):  # drained before a restart: still drained
                self.ledger.set_draining(draining=True)
                log.info("host.still_draining", host=s.host_name, fix="orchestrator resume, or POST /resume")

        _refuse_map_problems(self.image_map, s)
        _refuse_reference_conflicts(self.image_map, s)
        if s.amqp_prefetch is not None:
            log.warning(
                "config.amqp_prefetch_not_applied",
                amqp_prefetch=s.amqp_prefetch,
                why="each host's window sets its consumers' prefetch from what it can start now",
                fix="drop AMQP_PREFETCH; MAX_CONCURRENCY and CAPACITY_MAP bound what a host runs",
            )
        self.router = RouterHypervisor({}, s.backend)
        stack.push_async_callback(self.router.close)
        given = self._given_backends
        for name, labels in backends_needed(s, self.image_map).items():
            self.router.add(
                given[name] if given is not None and name in given else await build_backend(s, name, labels)
            )

        self.images = ImagePreparer(
            self.image_map,
            image_dir=s.images_dir,
            max_image_bytes=s.max_image_bytes,
            metrics=self.meters,
        )
        stack.push_async_callback(self.images.close)

        self._connection = await self._connect_broker()
        stack.push_async_callback(bounded(self._connection.close, "broker connection"))
        await self._declare(self.image_map)
        self._publisher = await ConfirmedPublisher.open(self._connection)
        self._events = await EventPublisher.open(self._connection, self.topology.events)
        self.outbox = ResultOutbox(self.journal, self._publisher, self.topology, metrics=self.meters)
        self.outbox.start()
        stack.push_async_callback(self._close_outbox)

        if s.http_listen != "off":
            with failing_as(
                f"cannot listen on HTTP_LISTEN {s.http_listen}", "choose a free address, or HTTP_LISTEN=off"
            ):
                http = await start_http(
                    self,
                    s.http_listen,
                    token=s.http_token,
                    limits=HttpLimits(
                        max_connections=s.http_max_connections,
                        header_timeout_s=s.http_header_timeout_s,
                        max_streams=s.http_max_streams,
                    ),
                    metrics=self.meters.registry,
                    fleet=self.fleet,
                    public_url=s.public_url,
                )
            stack.push_async_callback(bounded(http.cleanup, "HTTP API"))
        self._background(stack, self._heartbeat(), "heartbeat")
        self._background(stack, measure_loop_lag(self.meters), "loop-lag")

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
            metrics=self.meters,
            holder_of=self.fleet.holder_of,
        )
        self.pools = WarmPools(
            settings=s,
            image_map=self.image_map,
            router=self.router,
            ledger=self.ledger,
            images=self.images,
            emit=self._events.emit,
            metrics=self.meters,
        )
        self._connection.close_callbacks.add(self._broker_lost)
        self._connection.reconnect_callbacks.add(self._broker_back)
        stack.push_async_callback(self._ack_checks.cancel_all)
        cancels = CancelRegistry(self.journal)
        await cancels.load()
        self._intake = JobIntake(
            image_map=self.image_map,
            window=self.window,
            journal=self.journal,
            outbox=self.outbox,
            publisher=self._publisher,
            topology=self.topology,
            host=s.host_name,
            backend_of=self._backend_of,
            start_job=self.runner.start,
            cancelled=cancels,
            running=self.runner.running,
            wait_released=self.runner.wait_released,
            max_message_bytes=s.max_message_bytes,
            pools=self.pools,
            holder_of=functools.partial(self.fleet.holder_of, timeout_s=REDELIVERY_CHECK_S),
        )
        control = ControlListener(
            topology=self.topology,
            host=s.host_name,
            journal=self.journal,
            runner=self.runner,
            cancels=cancels,
            operator=self,
        )
        with failing_as("cannot listen to the control exchange"):
            await control.start(self._connection)
        stack.push_async_callback(bounded(control.stop, "control listener"))
        with failing_as("cannot listen to the fleet's heartbeats"):
            await self.fleet.start(self._connection)
        stack.push_async_callback(bounded(self.fleet.stop, "fleet view"))
        # Pushed after the control listener, so cancels still work while jobs drain.
        stack.push_async_callback(self._drain)
        with failing_as("cannot reconcile the journal with the hypervisors", "see the backend's error"):
            await reconcile(
                settings=s,
                image_map=self.image_map,
                journal=self.journal,
                router=self.router,
                runner=self.runner,
                ledger=self.ledger,
                outbox=self.outbox,
            )
        stack.push_async_callback(self._preparations.cancel_all)
        self._preparations.spawn(self._prepare_images(sorted(self.image_map.images)), name="prepare-images")
        self._background(stack, self._housekeeping(), "housekeeping")
        # After reconciliation (which destroyed the pool VMs of an earlier run), and
        # closed right after the consumers stop: idle pool VMs go before jobs drain.
        await self.pools.start()
        stack.push_async_callback(bounded(self.pools.close, "warm pools"))
        settler = Settler(self._publisher, self.topology, count_requeue=self._count_requeue)
        dead_letters = DeadLetterAnswerer(
            topology=self.topology,
            publisher=self._publisher,
            settler=settler,
            holder_of=self.fleet.holder_of,
            delivery_limit=s.delivery_limit,
            max_message_bytes=s.max_message_bytes,
            answered=self.meters.dead_letter_results.inc,
        )
        with failing_as("cannot consume the dead letters"):
            await dead_letters.start(self._connection)
        stack.push_async_callback(bounded(dead_letters.stop, "dead-letter answers"))
        ingress = ReferenceIngress(
            settings=s, topology=self.topology, handler=self._intake.on_unroutable_message, settler=settler
        )
        with failing_as(
            "cannot set up the reference integration's ingress (AMQP_EXCHANGE, AMQP_QUEUE)",
            "check the names, and that this broker user may declare and bind them",
        ):
            await ingress.start(self._connection)
        stack.push_async_callback(bounded(ingress.stop, "reference ingress"))
        self.scheduler = Scheduler(
            image_map=self.image_map,
            window=self.window,
            intake=self._intake,
            settler=settler,
            topology=self.topology,
        )
        with failing_as("cannot consume the label queues"):
            await self.scheduler.start(self._connection)
        stack.push_async_callback(bounded(self.scheduler.stop, "consumers"))

    def _count_requeue(self, reason: RequeueReason) -> None:
        self.meters.requeued(reason.value)

    def _default_size(self, label: str) -> Resources:
        return self.image_map.default_resources(label)

    # --- acks lost with the broker connection ----------------------------------------------
    def _broker_lost(self, _connection: object, exc: BaseException | None = None) -> None:
        if exc is not None and not isinstance(exc, asyncio.CancelledError) and self._broker_lost_at is None:
            self._broker_lost_at = time.time()

    def _broker_back(self, _connection: object) -> None:
        lost_at, self._broker_lost_at = self._broker_lost_at, None
        self.fleet.rediscover()
        if lost_at is None or self.runner is None:
            return
        doubtful = [
            running.job for running in self.runner.running.values() if running.job.accepted_at >= lost_at - ACK_DOUBT_S
        ]
        if doubtful:
            self._ack_checks.spawn(self._check_acks(doubtful), name="ack-check")

    async def _check_acks(self, jobs: list[AcceptedJob]) -> None:
        """Jobs whose ack may have gone down with the connection: the broker then gave
        them to another host, which asked this one first but got no answer while it was
        away. Where another host now has the attempt, this host's copy is stopped (no
        second result, no VM spent on it); where it is only checking, it will hear from
        this host and leave the job here."""
        runner = self.runner
        assert runner is not None

        async def check(job: AcceptedJob) -> None:
            try:
                holder = await self.fleet.holder_of(job.job_id, job.request.attempt)
            except FleetUnavailable:
                return  # gone again: the next reconnection asks
            if holder is not None and holder.state != "checking" and runner.supersede(job.job_id, holder.host):
                log.warning("job.ack_lost", job_id=job.job_id, holder=holder.host, holder_state=holder.state)

        await asyncio.gather(*(check(job) for job in jobs))

    async def _connect_broker(self) -> FailoverConnection:
        s = self.settings
        try:
            return await connect_with_retry(
                s.amqp_url,
                name=f"orchestrator@{s.host_name}",
                timeout_s=s.broker_connect_timeout_s,
                masked_url=s.masked_amqp_url(),
            )
        except (TimeoutError, OSError) as exc:
            raise StartupError(
                f"cannot connect to the broker at {s.masked_amqp_url()} within {s.broker_connect_timeout_s:g} s: "
                f"{describe_error(exc)} (start RabbitMQ or fix AMQP_URL; BROKER_CONNECT_TIMEOUT_S sets how long to wait)"
            ) from None

    async def _declare(self, image_map: ImageMap) -> None:
        assert self._connection is not None
        with failing_as(
            "cannot declare the broker's exchanges and queues",
            "every host of a fleet must use the same DELIVERY_LIMIT and QUORUM_SIZE; a queue declared with other arguments must be deleted first",
        ):
            declared = await declare_topology(
                self._connection,
                self.topology,
                image_map,
                delivery_limit=self.settings.delivery_limit,
                dlq_max_length=self.settings.dlq_max_length,
                quorum_size=self.settings.quorum_size,
            )
            await declared.channel.close()

    def _background(self, stack: AsyncExitStack, work: Coroutine[Any, Any, None], name: str) -> None:
        tasks = BackgroundTasks()
        tasks.spawn(work, name=name)
        stack.push_async_callback(tasks.cancel_all)

    async def _drain(self) -> None:
        """Let running jobs finish for `drain_timeout_s`, then shut their VMs down and
        hand the jobs back to the broker."""
        runner, s = self.runner, self.settings
        if runner is None or await runner.wait_idle(s.drain_timeout_s):
            return
        for job_id in list(runner.running):
            runner.stop_job(job_id, StopReason.SHUTDOWN)
        await runner.wait_idle(s.shutdown_timeout_s + 30)

    async def _close_outbox(self) -> None:
        assert self.outbox is not None
        await self.outbox.stop()
        await self.outbox.flush()

    async def reload(self) -> bool:
        """Re-read the image map (`SIGHUP`). A map that does not load is refused with its
        file:line message and the old one stays in force. New labels get queues and
        consumers, removed labels stop being consumed (their queued jobs stay in the
        broker for other hosts), changed images are prepared again; running jobs keep
        the entry they started with."""
        await self._started.wait()  # a SIGHUP during start-up is served once it is done
        async with self._reload_lock:
            s = self.settings
            try:
                new_map = await asyncio.to_thread(load_image_map, s.config, max_bytes=s.map_max_bytes)
                _refuse_map_problems(new_map, s)
                for name, labels in backends_needed(s, new_map).items():
                    if name not in self._router.backends:
                        self._router.add(await build_backend(s, name, labels))
                await self._declare(new_map)
            except (ImageMapError, StartupError) as exc:
                log.error("config.reload_refused", config=str(s.config), error=str(exc))
                return False
            assert self._intake is not None and self.images is not None and self.scheduler is not None
            try:  # the broker's part first: a failure there leaves the old map in force here
                await self.scheduler.update_map(new_map)
            except Exception as exc:
                log.error(
                    "config.reload_failed",
                    config=str(s.config),
                    error=describe_error(exc),
                    fix="the broker refused a consumer change; send SIGHUP again once it is back",
                )
                return False
            old, self.image_map = self.image_map, new_map
            self._intake.update_map(new_map)
            self.images.update_map(new_map)
            if self.pools is not None:
                self.pools.update_map(new_map)
            changed = sorted(
                label for label, image in new_map.images.items() if old.images.get(label) not in (None, image)
            )
            added = sorted(set(new_map.images) - set(old.images))
            log.info(
                "config.reloaded",
                config=str(s.config),
                added=added,
                changed=changed,
                removed=sorted(set(old.images) - set(new_map.images)),
            )
            self._preparations.spawn(self._prepare_images(added + changed), name="prepare-images")
            return True

    def _backend_of(self, image: ImageEntry) -> str:
        return self._router.backend_for(image.backend).name.value

    async def _prepare_images(self, labels: list[str]) -> None:
        """Fetch every missing or stale image of `labels`, in the background: jobs for
        ready images start at once, jobs for these wait for their image."""
        assert self.images is not None
        for label in labels:
            if label not in self.image_map.images or not self.images.needs_preparation(label):
                continue
            try:
                await self.images.prepare(label)
            except Exception as exc:  # logged by the preparer; a job for it gets an error result
                log.warning("image.prepare_at_start_failed", label=label, error=str(exc))

    async def _housekeeping(self) -> None:
        """Retention at start and hourly; the state directory's size and the DLQ's depth
        for /metrics once a minute. A failure is logged and tried again next time."""
        assert self.journal is not None and self.runner is not None and self._connection is not None
        s, loop = self.settings, asyncio.get_running_loop()
        next_sweep = loop.time()
        while True:
            try:
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + HOUSEKEEPING_SWEEP_S
                    await sweep(
                        self.journal, s.state, retention_days=s.retention_days, running=set(self.runner.running)
                    )
                self._state_dir_bytes = await asyncio.to_thread(directory_bytes, s.state_dir)
                channel = await self._connection.channel()
                try:
                    dlq = await channel.declare_queue(self.topology.dlq, passive=True)
                    self._dlq_messages = dlq.declaration_result.message_count
                finally:
                    # Never cancelled (the daemon stopping cancels this loop): aiormq can
                    # swallow a cancel that lands in a channel's close, or answer it with a
                    # second Channel.Close that the broker takes for a connection error.
                    await wait_uncancelled(channel.close(), CLOSE_STEP_TIMEOUT_S)
            except Exception as exc:
                log.warning("housekeeping.failed", error=describe_error(exc))
            await asyncio.sleep(HOUSEKEEPING_MEASURE_S)

    async def _heartbeat(self) -> None:
        assert self._events is not None
        while True:
            await self._events.emit(f"host.heartbeat.{self.settings.host_name}", self.heartbeat())
            await asyncio.sleep(self.settings.heartbeat_s)


async def run_daemon(settings: DaemonSettings, image_map: ImageMap) -> None:
    """Run until SIGINT or SIGTERM, then stop gracefully; SIGHUP reloads the image map.
    Raises `StartupError`."""
    # Descriptors for jobs, whatever HTTP clients hold: the soft limit up to the hard one.
    nofile = raise_open_files_limit()
    log.info("daemon.open_files_limit", soft=nofile.soft, hard=nofile.hard, before=nofile.before)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # `kill -USR1 <pid>` prints every thread's stack to stderr: what a stuck daemon does.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    restrict_umask()
    daemon = Daemon(settings, image_map)
    reloads = BackgroundTasks()
    # Installed before start: SIGHUP's default action would end the process.
    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.spawn(daemon.reload(), name="reload"))
    try:
        await daemon.start()
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await reloads.cancel_all()
        await daemon.stop()
