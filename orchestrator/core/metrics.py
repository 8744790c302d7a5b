"""The daemon's own histograms and gauges: how long jobs wait, boot and run, how image
preparations go, results the broker has not confirmed yet, how late the event loop
runs, and whether the host drains.

One `DaemonMetrics` per daemon, bound to a registry the daemon creates and the HTTP API
serves next to its scrape-time collectors (no global registry: two daemons in one
process, as in the tests, never share a series). The runner, the image preparer, the
outbox and the warm pools take it as an optional constructor argument; without it they
record nothing.
"""

from __future__ import annotations

import asyncio
import enum

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.core.logsetup import EventLogger

log = EventLogger("orchestrator.core.metrics")

# Seconds. A job may wait in its queue for hours on a busy fleet, and the alert on it
# looks at 10 and 30 minutes, so those are bucket bounds.
QUEUE_WAIT_BUCKETS = (0.05, 0.25, 1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 28800)
# A warm job's first command comes in tens of milliseconds, a cold boot of a stock
# cloud image under software emulation in about a minute; BOOT_TIMEOUT_S caps both.
BOOT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# Jobs run up to their timeout, which images commonly set to hours.
RUN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 10800, 14400, 21600)
PREPARE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)
PREPARE_BYTE_BUCKETS = tuple(float(2**20 * 4**k) for k in range(10))  # 1 MiB .. 256 GiB
LOOP_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

LOOP_LAG_INTERVAL_S = 0.5
LOOP_STALL_LOG_S = 1.0  # a stall this long is logged, at most once per LOOP_STALL_LOG_EVERY_S
LOOP_STALL_LOG_EVERY_S = 60.0


class PrepOutcome(str, enum.Enum):
    """How an image preparation ended (`images.Outcome`'s, where something was fetched)."""

    DOWNLOADED = "downloaded"
    UNCHANGED = "unchanged"
    FAILED = "failed"


class BootKind(str, enum.Enum):
    """What booted: a job's own VM, a pool VM, or a pool VM restored from its template."""

    JOB = "job"
    POOL = "pool"
    RESTORED = "restored"


class DaemonMetrics:
    """The series, created once in `registry`. Label values are image labels (bounded by
    the image map), job statuses, outcomes and kinds: never job ids."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.queue_wait = Histogram(
            "orchestrator_job_queue_wait_seconds",
            "Request submitted_at to accepted by this host (timings.queued_s)",
            ["label"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=registry,
        )
        self.boot = Histogram(
            "orchestrator_vm_boot_seconds",
            "VM asked for to its guest's first command (kind=job) or ready line (kind=pool|restored)",
            ["label", "kind"],
            buckets=BOOT_BUCKETS,
            registry=registry,
        )
        self.to_first_command = Histogram(
            "orchestrator_job_to_first_command_seconds",
            "Job accepted to its script's first command (timings.to_first_command_s)",
            ["label", "start"],
            buckets=BOOT_BUCKETS,
            registry=registry,
        )
        self.run = Histogram(
            "orchestrator_job_run_seconds",
            "Job started to finished (timings.run_s)",
            ["label", "status"],
            buckets=RUN_BUCKETS,
            registry=registry,
        )
        self.image_prepare = Histogram(
            "orchestrator_image_prepare_seconds",
            "Image preparations (download, verify, install)",
            ["label", "outcome"],
            buckets=PREPARE_BUCKETS,
            registry=registry,
        )
        self.image_prepare_bytes = Histogram(
            "orchestrator_image_prepare_bytes",
            "Bytes an image preparation wrote (decompressed)",
            ["label", "outcome"],
            buckets=PREPARE_BYTE_BUCKETS,
            registry=registry,
        )
        self.outbox_backlog = Gauge(
            "orchestrator_outbox_backlog",
            "Results stored in the journal that the broker has not confirmed",
            registry=registry,
        )
        self.loop_lag = Histogram(
            "orchestrator_event_loop_lag_seconds",
            f"How late a {LOOP_LAG_INTERVAL_S:g} s sleep on the event loop wakes",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.loop_lag_last = Gauge(
            "orchestrator_event_loop_lag_last_seconds",
            "The latest event loop lag measured",
            registry=registry,
        )
        self.draining = Gauge(
            "orchestrator_draining",
            "1 while the host takes no new jobs (draining)",
            registry=registry,
        )
        self.requeues = Counter(
            "orchestrator_requeues_total",
            "Job deliveries handed back to the broker, by reason; each counts toward DELIVERY_LIMIT",
            ["reason"],
            registry=registry,
        )
        self.held = Gauge(
            "orchestrator_deliveries_held",
            "Deliveries held un-acked, waiting for room for their size",
            registry=registry,
        )
        self.claimed = Gauge(
            "orchestrator_window_claims",
            "Room promised to deliveries the broker may send this host (its window)",
            registry=registry,
        )
        self.dead_letter_results = Counter(
            "orchestrator_dead_letter_results_total",
            "Error results published for dead-lettered job requests",
            registry=registry,
        )

    def count_reasons(self, reasons: list[str]) -> None:
        """Show every requeue reason from zero on (a first requeue must be an increase)."""
        for reason in reasons:
            self.requeues.labels(reason)

    def requeued(self, reason: str) -> None:
        self.requeues.labels(reason).inc()

    def job_accepted(self, *, label: str, queued_s: float) -> None:
        self.queue_wait.labels(label).observe(queued_s)

    def job_finished(
        self,
        *,
        label: str,
        status: str,
        warm: bool,
        run_s: float | None,
        to_first_command_s: float | None,
        boot_s: float | None,
    ) -> None:
        """One finished job's timings; None for what it never reached (a VM that did not
        start has no run, a script that never began no first command)."""
        if run_s is not None:
            self.run.labels(label, status).observe(run_s)
        if to_first_command_s is not None:
            self.to_first_command.labels(label, "warm" if warm else "cold").observe(to_first_command_s)
        if boot_s is not None:
            self.boot.labels(label, BootKind.JOB.value).observe(boot_s)

    def vm_booted(self, *, label: str, kind: BootKind, seconds: float) -> None:
        self.boot.labels(label, kind.value).observe(seconds)

    def image_known(self, label: str) -> None:
        """Show the image's preparations from zero on: Prometheus sees no increase in a
        series that a first failure creates, so an alert would miss that failure."""
        for outcome in PrepOutcome:
            self.image_prepare.labels(label, outcome.value)
            self.image_prepare_bytes.labels(label, outcome.value)

    def image_prepared(self, *, label: str, outcome: PrepOutcome, seconds: float, bytes_written: int) -> None:
        self.image_prepare.labels(label, outcome.value).observe(seconds)
        self.image_prepare_bytes.labels(label, outcome.value).observe(bytes_written)


async def measure_loop_lag(metrics: DaemonMetrics, *, interval_s: float = LOOP_LAG_INTERVAL_S) -> None:
    """Forever: sleep `interval_s` and record how much later than that the loop woke us.
    Whatever blocks the loop (a blocking call that should be in a thread, a burst of
    work) delays every job's bookkeeping, HTTP answer and heartbeat by as much."""
    loop = asyncio.get_running_loop()
    quiet_until = 0.0
    while True:
        before = loop.time()
        await asyncio.sleep(interval_s)
        now = loop.time()
        lag = max(0.0, now - before - interval_s)
        metrics.loop_lag.observe(lag)
        metrics.loop_lag_last.set(lag)
        if lag >= LOOP_STALL_LOG_S and now >= quiet_until:
            quiet_until = now + LOOP_STALL_LOG_EVERY_S
            log.warning("event_loop.stalled", lag_s=round(lag, 3), interval_s=interval_s)
