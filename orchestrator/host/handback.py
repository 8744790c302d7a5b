"""Handing a job back to the broker as its next attempt, unless another host has it.

A job comes back here when it cannot finish on this host: the host shuts down, its VM
vanished while the daemon was away, its pool VM never got it. Its request is published
again as attempt n+1 for any host to take. But attempt n may already run elsewhere: when
this host was killed before its ack reached the broker, or the ack went down with a
broker node, the broker delivered attempt n again, to another host. Publishing n+1 then
would run the job twice. So the fleet is asked first (`holder`): a host whose journal has
attempt n or later owns the job, and it is left to that host (`superseded` here).

A host checking attempt n itself (it asks before taking a redelivery) decides within its
own question's timeout: it is asked again once, then left to run it if it still checks.

The broker may be away (a node restart, the daemon starting while it fails over): the
question and the publish are retried with backoff for `HAND_BACK_RETRY_S`, except while
the daemon shuts down (one try: the job stays live in the journal and its next start
hands it back).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable

import tenacity

from orchestrator.core.amqp import ConfirmedPublisher, describe_error, json_message
from orchestrator.core.fleet import LOCATE_TIMEOUT_S
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import JobHolding, JobRequest, message_id_for
from orchestrator.core.topology import Topology

HAND_BACK_RETRY_S = 120.0

HolderOf = Callable[[str, int], Awaitable[JobHolding | None]]


async def _nobody(_job_id: str, _attempt: int) -> JobHolding | None:
    return None


class HandBackOutcome(enum.Enum):
    REQUEUED = "requeued"  # published as the next attempt
    LAST_ATTEMPT = "last_attempt"  # nobody else has it, and it may not be tried again
    SUPERSEDED = "superseded"  # another host has this attempt or a later one


class HandBack:
    def __init__(self, *, publisher: ConfirmedPublisher, topology: Topology, holder_of: HolderOf | None = None) -> None:
        self._publisher = publisher
        self._topology = topology
        self._holder_of = holder_of or _nobody

    async def give_back(
        self, request: JobRequest, label: str, *, jlog: EventLogger, stopping: Callable[[], bool], max_attempts: int
    ) -> tuple[HandBackOutcome, JobHolding | None]:
        """Publish `request` as its next attempt on `label`'s queue (unless it was the
        last one), or leave it to the host that has it. Raises the last error when the
        broker stayed away (at once when `stopping()`)."""
        retrying = tenacity.AsyncRetrying(
            stop=tenacity.stop_after_delay(HAND_BACK_RETRY_S) | _WhenStopping(stopping),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=lambda state: jlog.warning(
                "job.hand_back_retry",
                attempt=request.attempt,
                retry_in_s=round(state.upcoming_sleep, 2),
                error=describe_error(state.outcome.exception() if state.outcome else None),
            ),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                holder = await self._holder(request)
                if holder is not None:
                    return HandBackOutcome.SUPERSEDED, holder
                if request.attempt >= max_attempts:
                    return HandBackOutcome.LAST_ATTEMPT, None
                retry = request.model_copy(update={"attempt": request.attempt + 1})
                await self._publisher.publish(
                    self._topology.jobs,
                    label,
                    json_message(retry, message_id=message_id_for(request.job_id, retry.attempt)),
                )
                return HandBackOutcome.REQUEUED, None
        raise AssertionError("unreachable: tenacity re-raises the last error")

    async def _holder(self, request: JobRequest) -> JobHolding | None:
        holder = await self._holder_of(request.job_id, request.attempt)
        if holder is not None and holder.state == "checking":
            await asyncio.sleep(LOCATE_TIMEOUT_S)  # its own question ends by then
            holder = await self._holder_of(request.job_id, request.attempt)
        return holder if holder is not None and holder.state != "checking" else None


class _WhenStopping(tenacity.stop.stop_base):
    """Stop retrying once the daemon shuts down (`stopping()`)."""

    def __init__(self, stopping: Callable[[], bool]) -> None:
        self._stopping = stopping

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return self._stopping()
