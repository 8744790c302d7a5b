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
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from orchestrator.core.amqp import ConfirmedPublisher, describe_error, json_message
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import ControlKind, ControlMessage, JobRequest, message_id_for
from orchestrator.core.topology import Topology
from orchestrator.forge.base import Forge, ForgeEvent
from orchestrator.forge.config import LoadedForgeConfig
from orchestrator.forge.http import ForgeApiError
from orchestrator.forge.journal import BridgeJournal, Delivery, Run
from orchestrator.forge.planner import event_from_json, event_to_json, plan_event, request_id_for
from orchestrator.forge.status import queued, superseded

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
        statuses_changed: Callable[[], None],
        concurrency: int = 32,
    ) -> None:
        self._journal = journal
        self._forges = forges
        self._config = config
        self._publisher = publisher
        self._topology = topology
        self._propose_status = propose_status
        self._statuses_changed = statuses_changed
        self._slots = asyncio.Semaphore(concurrency)
        self._busy: set[str] = set()  # delivery keys being processed
        self._tasks: set[asyncio.Task[None]] = set()
        self._publishing: dict[str, asyncio.Future[bool]] = {}  # request id -> its publish under way
        self.counts: Counter[str] = Counter()  # for /metrics: deliveries by outcome, jobs published
        self.last_webhook: dict[tuple[str, str], float] = {}  # (forge, repo) -> when its last webhook came

    async def submit(self, forge: str, delivery_id: str, event: ForgeEvent, *, source: str) -> bool:
        """Journal a delivery to process; False when it was recorded before (a
        redelivery: nothing new happens)."""
        if source == "webhook":
            self.last_webhook[(forge, event.repo.full_name)] = time.time()
        key, data = f"{forge}/{delivery_id}", event_to_json(event)
        fresh = await self._journal.record_delivery(
            key, forge=forge, repo=event.repo.full_name, source=source, event=data
        )
        if fresh:  # straight to work; the journal is scanned only at start and after a failure
            self._start(Delivery(key, forge, event.repo.full_name, source, data))
        return fresh

    async def run_forever(self) -> None:
        """Take up the deliveries left open before a restart, then serve `submit`. Each
        delivery is its own task (up to `concurrency` work at once) that retries with
        backoff until its jobs are published."""
        try:
            for delivery in await self._journal.open_deliveries():
                self._start(delivery)
            await asyncio.Event().wait()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, delivery: Delivery) -> None:
        if delivery.key in self._busy:
            return
        self._busy.add(delivery.key)
        task = asyncio.create_task(self._until_done(delivery), name=f"delivery-{delivery.key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _until_done(self, delivery: Delivery) -> None:
        delay = RETRY_INITIAL_S
        try:
            while True:
                async with self._slots:
                    try:
                        if await self._process(delivery):
                            return
                    except Exception as exc:  # one bad delivery must not stop the others
                        log.error("delivery.failed", delivery=delivery.key, error=describe_error(exc), exc_info=True)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
        finally:
            self._busy.discard(delivery.key)

    async def settled(self) -> None:
        """Wait until no delivery is being processed (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _process(self, delivery: Delivery) -> bool:
        dlog = log.bind(delivery=delivery.key, repo=delivery.repo, source=delivery.source)
        event = event_from_json(delivery.event)
        repo = self._config.config.repository(delivery.forge, delivery.repo)
        forge = self._forges.get(delivery.forge)
        if repo is None or forge is None:
            await self._journal.finish_delivery(delivery.key, "the repository is no longer configured")
            return True
        try:
            plan = await plan_event(
                event, forge_name=delivery.forge, forge=forge, repo=repo, secrets=self._config.secrets_for(repo)
            )
        except ForgeApiError as exc:
            dlog.warning("delivery.jobs_file_unreadable", error=str(exc), retry=exc.retry_after_s is not None)
            if exc.retry_after_s is not None:
                return False
            await self._journal.finish_delivery(delivery.key, f"jobs file unreadable: {exc}")
            return True
        if repo.cancel_superseded:
            await self._supersede(delivery.forge, event)
        caught_up = delivery.source == "catch-up"
        # "queued" is proposed before the job is published, so it is never proposed
        # after "running" (statuses only move forward: a late one would be dropped).
        statuses = [(delivery.forge, event.repo, event.commit_sha, status) for status in plan.statuses]
        statuses += [
            (run.forge, run.repo, run.commit_sha, queued(run.context, caught_up=caught_up)) for run in plan.runs
        ]
        current, changed = await self._journal.add_plan(plan.runs, statuses)
        if changed:
            self._statuses_changed()
        waiting = [run for run in current if not run.published]
        sent = await asyncio.gather(*(self._publish_once(run) for run in waiting))
        published = [run.request_id for run, ok in zip(waiting, sent, strict=True) if ok]
        done = all(sent)
        outcome = f"published {len(published)} job(s)" + (f"; {plan.note}" if plan.note else "") if done else None
        head = (delivery.forge, event.repo.full_name, event.ref_key, event.commit_sha)
        await self._journal.complete_delivery(delivery.key, published=published, head=head, outcome=outcome)
        if done:
            self.counts["deliveries_done"] += 1
            dlog.info("delivery.done", commit=event.commit_sha, ref=event.ref_key, outcome=outcome)
        return done

    async def _publish_once(self, run: Run) -> bool:
        """Publish a run's job, or wait for the publish of it already under way (two
        deliveries of the same work at once publish it once)."""
        under_way = self._publishing.get(run.request_id)
        if under_way is not None:
            return await asyncio.shield(under_way)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._publishing[run.request_id] = future
        try:
            ok = await self._publish_one(run)
            future.set_result(ok)
            return ok
        except BaseException:
            future.set_result(False)
            raise
        finally:
            del self._publishing[run.request_id]

    async def _publish_one(self, run: Run) -> bool:
        """Publish a run's job with confirms (the caller journals that it was)."""
        request = JobRequest.model_validate_json(run.request)
        try:
            await self._publisher.publish(
                self._topology.jobs,
                request.runs_on or "",
                json_message(request, message_id=message_id_for(run.request_id, request.attempt)),
            )
        except Exception as exc:  # the broker is away: the run stays unpublished, tried again
            log.warning("job.publish_failed", job_id=run.request_id, error=describe_error(exc))
            return False
        self.counts["jobs_published"] += 1
        log.info(
            "job.published", job_id=run.request_id, repo=run.repo.full_name, commit=run.commit_sha, job=run.job_name
        )
        return True

    async def rerun(self, repo: str, commit_sha: str, *, job: str | None = None) -> list[Run]:
        """Publish new runs of a commit's jobs (each ref it ran for, the newest run of
        each job), with fresh `pending` statuses. Runs of a commit are found in the
        journal: a commit the bridge never ran cannot be re-run (push it, or wait for
        catch-up)."""
        earlier = [run for run in await self._journal.runs_for_commit(repo, commit_sha) if job in (None, run.job_name)]
        newest: dict[tuple[str, str, str], Run] = {(r.forge, r.ref_key, r.job_name): r for r in earlier}
        fresh: list[Run] = []
        for (forge, ref_key, name), run in sorted(newest.items()):
            number = 1 + sum(
                1
                for r in earlier
                if (r.forge, r.ref_key, r.job_name) == (forge, ref_key, name) and r.request_id != _first_id(r)
            )
            request_uuid = request_id_for(forge, repo, ref_key, commit_sha, name, rerun=number)
            request = JobRequest.model_validate_json(run.request).model_copy(
                update={"request_id": request_uuid, "attempt": 1}
            )
            request_id = str(request_uuid)
            fresh.append(
                Run(
                    request_id,
                    forge,
                    run.repo,
                    commit_sha,
                    ref_key,
                    name,
                    run.context,
                    request.model_dump_json(),
                    False,
                )
            )
        await self._journal.add_plan(fresh, [])
        for run in fresh:
            await self._propose_status(run.forge, run.repo, run.commit_sha, queued(run.context), restart=True)
            if await self._publish_once(run):
                await self._journal.complete_delivery(None, published=[run.request_id], head=None, outcome=None)
        return fresh

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
                    self._topology.control,
                    "",
                    json_message(ControlMessage(kind=ControlKind.CANCEL, request_id=old.request_id), persistent=False),
                )
            except Exception as exc:  # the job's own result still arrives; only the cancel is lost
                log.warning("job.supersede_failed", job_id=old.request_id, error=describe_error(exc))
            await self._propose_status(forge, old.repo, old.commit_sha, superseded(old.context, event.commit_sha))
            log.info("job.superseded", job_id=old.request_id, by=event.commit_sha)


def _first_id(run: Run) -> str:
    """The request id the first run of this work has (re-runs add their number)."""
    return str(request_id_for(run.forge, run.repo.full_name, run.ref_key, run.commit_sha, run.job_name))
