"""Results and job events become commit statuses, through each forge's API.

The bridge has its own durable quorum queue (`<prefix>.forge.status`) bound to the
results exchange and to the job events, so nothing is missed while it is down. A
message for a job the bridge did not publish is acknowledged and ignored. For one of
ours the wanted status is journaled first (it only ever moves forward: queued, running,
final) and the message acknowledged; a sender then sets it on the forge: 5xx, network
errors and rate limits are retried with backoff (never sooner than the forge asked),
other 4xx are logged, counted and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from orchestrator.core.amqp import describe_error
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import EventKind, JobEvent, JobResult
from orchestrator.core.topology import Topology, quorum_queue_arguments
from orchestrator.forge.base import CommitStatus, Forge, Repo
from orchestrator.forge.http import ForgeApiError
from orchestrator.forge.journal import BridgeJournal, PendingStatus
from orchestrator.forge.status import finished, running

log = EventLogger("orchestrator.forge.reporter")

RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 300.0
PREFETCH = 64
SEND_LEASE_S = 120.0  # longer than one forge call can take (the API clients time out at 30 s)


class StatusReporter:
    def __init__(
        self,
        *,
        journal: BridgeJournal,
        forges: Mapping[str, Forge],
        topology: Topology,
        delivery_limit: int,
        quorum_size: int,
    ) -> None:
        self._journal = journal
        self._forges = forges
        self._topology = topology
        self._delivery_limit = delivery_limit
        self._quorum_size = quorum_size
        self._wake = asyncio.Event()
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self.sent: Counter[str] = Counter()  # forge -> statuses set
        self.dropped: Counter[tuple[str, str]] = Counter()  # (forge, HTTP status) -> given up

    def wake(self) -> None:
        """Statuses were proposed directly in the journal: send them."""
        self._wake.set()

    async def propose(
        self, forge: str, repo: Repo, commit_sha: str, status: CommitStatus, *, restart: bool = False
    ) -> None:
        if await self._journal.propose_status(forge, repo, commit_sha, status, restart=restart):
            self._wake.set()

    # --- from the broker ------------------------------------------------------------------
    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        await self._channel.set_qos(prefetch_count=PREFETCH)
        queue = await self._channel.declare_queue(
            self._topology.forge_status_queue,
            durable=True,
            arguments=quorum_queue_arguments(self._quorum_size, **{"x-delivery-limit": self._delivery_limit}),
        )
        await queue.bind(self._topology.results, routing_key="#")
        await queue.bind(self._topology.events, routing_key="job.#")
        await queue.consume(self._on_message)

    async def stop(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            wanted = await self._status_for(message)
        except Exception as exc:  # the journal is away: the broker redelivers it
            log.warning("status.message_failed", error=describe_error(exc))
            await message.nack(requeue=True)
            return
        if wanted is not None:
            forge, repo, sha, status = wanted
            await self.propose(forge, repo, sha, status)
        await message.ack()

    async def _status_for(self, message: AbstractIncomingMessage) -> tuple[str, Repo, str, CommitStatus] | None:
        try:
            if message.exchange == self._topology.results:
                result = JobResult.model_validate_json(message.body)
                request_id, event = str(result.request_id), None
            else:
                event = JobEvent.model_validate_json(message.body)
                if event.kind is not EventKind.STARTED:
                    return None  # queued is shown when the bridge publishes; results carry the end
                request_id, result = str(event.request_id), None
        except ValidationError:
            return None  # not ours to judge; the daemons' own consumers see it too
        run = await self._journal.run(request_id)
        if run is None:
            return None  # a job that did not come from a forge
        if result is not None:
            return run.forge, run.repo, run.commit_sha, finished(run.context, result)
        assert event is not None
        return run.forge, run.repo, run.commit_sha, running(run.context, event.host, event.log_url)

    # --- to the forges ----------------------------------------------------------------------
    async def send_forever(self) -> None:
        while True:
            self._wake.clear()
            await self.send_due()
            next_try = await self._journal.next_status_try()
            timeout = None if next_try is None else max(0.05, next_try - time.time())
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            except TimeoutError:
                pass

    async def send_due(self) -> None:
        for pending in await self._journal.statuses_to_send(time.time()):
            await self._send(pending)

    async def _send(self, listed: PendingStatus) -> None:
        # `forge catch-up` and `forge rerun` send from the same journal as the service:
        # one sender of a context at a time, each sending the step that is oldest when it
        # claims the context (the listed one may have been sent meanwhile).
        pending = await self._journal.claim_status(listed, now=time.time(), lease_s=SEND_LEASE_S)
        if pending is None:
            return
        try:
            await self._send_claimed(pending)
        except BaseException:  # cancelled (a stop) or a bug: let the next sender have it now
            await asyncio.shield(self._journal.status_release(pending))
            raise

    async def _send_claimed(self, pending: PendingStatus) -> None:
        forge = self._forges.get(pending.forge)
        if forge is None:
            await self._journal.status_done(pending, error="forge no longer configured")
            return
        slog = log.bind(
            forge=pending.forge,
            repo=pending.repo.full_name,
            commit=pending.commit_sha,
            context=pending.status.context,
            state=pending.status.state.value,
        )
        try:
            await forge.set_status(pending.repo, pending.commit_sha, pending.status)
        except ForgeApiError as exc:
            if exc.retry_after_s is None:
                self.dropped[(pending.forge, str(exc.status))] += 1
                slog.error("status.dropped", error=str(exc), http_status=exc.status)
                await self._journal.status_done(pending, error=str(exc))
                return
            backoff = min(RETRY_MAX_S, RETRY_INITIAL_S * 2**pending.attempts)
            wait = max(exc.retry_after_s, backoff)
            slog.warning("status.retry", error=str(exc), retry_in_s=round(wait, 2), attempt=pending.attempts + 1)
            await self._journal.status_retry(pending, at=time.time() + wait, error=str(exc))
            return
        self.sent[pending.forge] += 1
        slog.info("status.set", description=pending.status.description)
        await self._journal.status_done(pending)
