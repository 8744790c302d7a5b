"""Results go to the journal first, then to the broker with confirms, retried until it
takes them (DESIGN.md "Durability"): a broker outage delays results, never loses them.
The backlog (stored, not yet confirmed) is what the journal says at each retry pass."""

from __future__ import annotations

import asyncio

from orchestrator.core.amqp import ConfirmedPublisher, broker_cancellation_as_error, describe_error, json_message
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import JobResult, message_id_for
from orchestrator.core.metrics import DaemonMetrics
from orchestrator.core.topology import Topology
from orchestrator.host.journal import JobState, Journal

log = EventLogger("orchestrator.host.outbox")


class ResultOutbox:
    def __init__(
        self,
        journal: Journal,
        publisher: ConfirmedPublisher,
        topology: Topology,
        *,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self._journal = journal
        self._publisher = publisher
        self._topology = topology
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._metrics = metrics
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # job ids with a publish under way, so the retry loop never sends one twice
        self._in_flight: set[str] = set()
        self.published = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._retry_loop(), name="result-outbox")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def deliver(self, result: JobResult, *, stored: bool) -> None:
        """Store the result (unless `stored`), then try to publish it now; when the broker
        is away the retry loop publishes it later."""
        job_id = str(result.request_id)
        if not stored:
            await self._journal.move(
                job_id, JobState.FINISHED, result=result, finished_at=result.completed_at.timestamp()
            )
        if not await self._publish(result):
            self._wake.set()

    async def _publish(self, result: JobResult) -> bool:
        job_id = str(result.request_id)
        if job_id in self._in_flight:
            return True
        self._in_flight.add(job_id)
        try:
            return await self._publish_once(job_id, result)
        finally:
            self._in_flight.discard(job_id)

    async def _publish_once(self, job_id: str, result: JobResult) -> bool:
        try:
            await self._publisher.publish(
                self._topology.results,
                job_id,
                json_message(result, message_id=message_id_for(job_id, result.attempt)),
                timeout_s=10,
            )
        except Exception as exc:
            log.warning("result.publish_failed", job_id=job_id, error=str(exc) or type(exc).__name__)
            return False
        await self._journal.move(job_id, JobState.PUBLISHED, published_at=result.completed_at.timestamp())
        self.published += 1
        log.info("result.published", job_id=job_id, status=result.status.value)
        return True

    async def flush(self) -> int:
        """Publish every stored, unpublished result once; returns how many are left."""
        left = 0
        for record in await self._journal.in_states({JobState.FINISHED}):
            if record.result is not None and not await self._publish(record.result):
                left += 1
        if self._metrics is not None:
            # Counted from the journal, not kept up by hand: results stored by an earlier
            # run of the daemon are in it, and nothing can drift.
            self._metrics.outbox_backlog.set(left)
        return left

    async def _retry_loop(self) -> None:
        delay = self._retry_initial_s
        while True:
            try:
                with broker_cancellation_as_error():
                    left = await self.flush()
            except Exception as exc:  # the journal or the broker failed this pass: the next one tries again
                log.warning("outbox.pass_failed", error=describe_error(exc))
                left = 1
            if left == 0:
                delay = self._retry_initial_s
                await self._wake.wait()
                self._wake.clear()
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
                self._wake.clear()
            except TimeoutError:
                pass
            delay = min(delay * 2, self._retry_max_s)
