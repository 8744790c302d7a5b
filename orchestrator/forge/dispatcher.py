"""Journaled deliveries become published jobs, in the background, until each is done.

A delivery (webhook, catch-up or re-run) is in the journal before anyone is told it was
taken. The dispatcher then reads the commit's jobs file, journals one run per job,
publishes each with publisher confirms, marks it published, and shows `pending
"queued"` on the commit. Anything that fails for now — the forge's API away or rate
limited, the broker down — leaves the delivery open and is tried again with backoff, so
an outage delays jobs and never drops them. A run already published (same request id)
is never published again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from orchestrator.amqp import ConfirmedPublisher, describe_error, json_message
from orchestrator.forge.base import Forge, ForgeApiError, ForgeEvent
from orchestrator.forge.config import LoadedForgeConfig
from orchestrator.forge.journal import BridgeJournal, Delivery, Run
from orchestrator.forge.planner import event_from_json, event_to_json, plan_event
from orchestrator.forge.status import queued, superseded
from orchestrator.logsetup import EventLogger
from orchestrator.messages import ControlKind, ControlMessage, JobRequest, message_id_for
from orchestrator.topology import Topology

log = EventLogger("orchestrator.forge.dispatcher")

RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0

class Dispatcher:
    def __init__(
        self,
        *,
        journal: BridgeJournal,
        forges: Mapping[str, Forge],
        config: LoadedForgeConfig,
        publisher: ConfirmedPublisher,
        topology: Topology,
        propose_status: Callable[..., Awaitable[None]],
    ) -> None:
        self._journal = journal
        self._forges = forges
        self._config = config
        self._publisher = publisher
        self._topology = topology
        self._propose_status = propose_status
        self._wake = asyncio.Event()
        self.counts: Counter[str] = Counter()  # for /metrics: deliveries by outcome, jobs published

    async def submit(self, forge: str, delivery_id: str, event: ForgeEvent, *, source: str) -> bool:
        """Journal a delivery to process; False when it was recorded before (a
        redelivery: nothing new happens)."""
        fresh = await self._journal.record_delivery(
            f"{forge}/{delivery_id}", forge=forge, repo=event.repo.full_name, source=source, event=event_to_json(event)
        )
        if fresh:
            self._wake.set()
        return fresh

    def wake(self) -> None:
        self._wake.set()

    async def run_forever(self) -> None:
        delay = RETRY_INITIAL_S
        while True:
            self._wake.clear()
            left = await self.work_once()
            if not left:
                delay = RETRY_INITIAL_S
                await self._wake.wait()
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, RETRY_MAX_S)

    async def work_once(self) -> int:
        """Process every open delivery and publish every unpublished run once; returns
        how many are left for later."""
        left = 0
        for delivery in await self._journal.open_deliveries():
            if not await self._process(delivery):
                left += 1
        for run in await self._journal.unpublished_runs():
            if not await self._publish(run):
                left += 1
        return left

    async def _process(self, delivery: Delivery) -> bool:
        dlog = log.bind(delivery=delivery.key, repo=delivery.repo, source=delivery.source)
        event = event_from_json(delivery.event)
        repo = self._config.config.repository(delivery.forge, delivery.repo)
        forge = self._forges.get(delivery.forge)
        if repo is None or forge is None:
            await self._journal.finish_delivery(delivery.key, "the repository is no longer configured")
            return True
        try:
            plan = await plan_event(event, forge_name=delivery.forge, forge=forge, repo=repo,
                                    secrets=self._config.secrets_for(repo))
        except ForgeApiError as exc:
            dlog.warning("delivery.jobs_file_unreadable", error=str(exc), retry=exc.retry_after_s is not None)
            if exc.retry_after_s is not None:
                return False
            await self._journal.finish_delivery(delivery.key, f"jobs file unreadable: {exc}")
            return True
        for status in plan.statuses:
            await self._propose_status(delivery.forge, event.repo, event.commit_sha, status)
        if repo.cancel_superseded:
            await self._supersede(delivery.forge, event)
        for run in plan.runs:
            await self._journal.add_run(run)
        published = 0
        for run in plan.runs:
            current = await self._journal.run(run.request_id)
            if current is not None and not current.published:
                if not await self._publish(current, caught_up=delivery.source == "catch-up"):
                    return False
                published += 1
        await self._journal.record_head(delivery.forge, event.repo.full_name, event.ref_key, event.commit_sha)
        outcome = f"published {published} job(s)" + (f"; {plan.note}" if plan.note else "")
        await self._journal.finish_delivery(delivery.key, outcome)
        self.counts["deliveries_done"] += 1
        dlog.info("delivery.done", commit=event.commit_sha, ref=event.ref_key, outcome=outcome)
        return True

    async def _publish(self, run: Run, *, caught_up: bool = False) -> bool:
        request = JobRequest.model_validate_json(run.request)
        # Shown before the job can start, so "queued" is never proposed after "running"
        # (statuses only move forward: a late one would be dropped).
        await self._propose_status(run.forge, run.repo, run.commit_sha, queued(run.context, caught_up=caught_up))
        try:
            await self._publisher.publish(
                self._topology.jobs, request.runs_on or "",
                json_message(request, message_id=message_id_for(run.request_id, request.attempt)),
            )
        except Exception as exc:  # the broker is away: the run stays unpublished, tried again
            log.warning("job.publish_failed", job_id=run.request_id, error=describe_error(exc))
            return False
        await self._journal.mark_published(run.request_id)
        self.counts["jobs_published"] += 1
        log.info("job.published", job_id=run.request_id, repo=run.repo.full_name, commit=run.commit_sha, job=run.job_name)
        return True

    async def _supersede(self, forge: str, event: ForgeEvent) -> None:
        """Cancel the jobs of this ref's earlier heads that have no final status yet."""
        for old in await self._journal.runs_for_ref(forge, event.repo.full_name, event.ref_key):
            if old.commit_sha == event.commit_sha or not old.published:
                continue
            state = await self._journal.last_status(forge, old.repo.full_name, old.commit_sha, old.context)
            if state is not None and state.final:
                continue
            try:
                await self._publisher.publish(
                    self._topology.control, "",
                    json_message(ControlMessage(kind=ControlKind.CANCEL, request_id=old.request_id), persistent=False),
                )
            except Exception as exc:  # the job's own result still arrives; only the cancel is lost
                log.warning("job.supersede_failed", job_id=old.request_id, error=describe_error(exc))
            await self._propose_status(forge, old.repo, old.commit_sha, superseded(old.context, event.commit_sha))
            log.info("job.superseded", job_id=old.request_id, by=event.commit_sha)
