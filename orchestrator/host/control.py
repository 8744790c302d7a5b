"""Control messages on `<prefix>.control`, a fanout every host listens to: cancel, and
what operators ask of the fleet (describe, drain, resume, jobs, locate), and what hosts
ask each other before running a job twice (holder).

A cancel is remembered by every host for a day (journal and memory): the host running
the job destroys its VM and publishes a `cancelled` result; a host that later takes the
job from its queue drops it with a `cancelled` result instead of running it. Each host
answers the sender (`reply_to`) with what it knows, so `orchestrator cancel` can say
whether the job was running, had finished, or is unknown. Drain, resume and jobs may
name hosts; a host not named ignores them (and does not answer).
"""

from __future__ import annotations

from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from pydantic import BaseModel, ValidationError

from orchestrator.core.amqp import json_message
from orchestrator.core.fleet import NOT_HELD
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import (
    CancelOutcome,
    CancelReply,
    ControlKind,
    ControlMessage,
    Heartbeat,
    JobHolding,
    JobLocation,
    JobsQuery,
    JobsReply,
    JobSummary,
)
from orchestrator.core.topology import Topology
from orchestrator.host.journal import JobState, Journal
from orchestrator.host.runner import JobRunner, StopReason

log = EventLogger("orchestrator.host.control")

CANCEL_MEMORY_S = 24 * 3600


class CancelRegistry:
    """Job ids cancelled in the last day, in memory for the hot path, journaled for restarts."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._ids: set[str] = set()

    async def load(self) -> None:
        self._ids = await self._journal.recent_cancels(CANCEL_MEMORY_S)

    async def add(self, job_id: str) -> None:
        await self._journal.remember_cancel(job_id)
        self._ids.add(job_id)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._ids


class HostControl(Protocol):
    """What operators may ask of a host (the daemon)."""

    def heartbeat(self) -> Heartbeat: ...

    async def set_draining(self, draining: bool) -> Heartbeat: ...

    async def jobs(self, query: JobsQuery) -> list[JobSummary]: ...

    async def locate(self, job_id: str) -> JobLocation | None: ...

    async def holding(self, job_id: str) -> JobHolding | None: ...


class ControlListener:
    def __init__(
        self,
        *,
        topology: Topology,
        host: str,
        journal: Journal,
        runner: JobRunner,
        cancels: CancelRegistry,
        operator: HostControl,
    ) -> None:
        self._topology = topology
        self._host = host
        self._journal = journal
        self._runner = runner
        self._cancels = cancels
        self._operator = operator
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queue: AbstractQueue | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        self._channel = await connection.channel()
        control = await self._channel.get_exchange(self._topology.control, ensure=False)
        self._queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await self._queue.bind(control)
        # The queue is this host's own, exclusive and gone with its connection: an ack
        # would protect nothing, so the broker settles each message as it delivers it
        # (and a host's acks on the wire are its jobs' alone).
        await self._queue.consume(self._on_message, no_ack=True)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            control = ControlMessage.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("control.malformed", error=str(exc.errors()[:1]))
            return
        reply = await self._answer(control)
        if reply is None:
            return
        if message.reply_to and self._channel is not None:
            await self._channel.default_exchange.publish(
                json_message(reply, persistent=False), routing_key=message.reply_to, mandatory=False
            )

    async def _answer(self, control: ControlMessage) -> BaseModel | bytes | None:
        kind, operator = control.kind, self._operator
        if kind is ControlKind.CANCEL and control.request_id is not None:
            return await self.cancel(str(control.request_id))
        if kind is ControlKind.DESCRIBE:
            return operator.heartbeat()
        if kind is ControlKind.LOCATE and control.request_id is not None:
            # `null` when the job is not here: the asker can stop waiting once every host has answered.
            return await operator.locate(str(control.request_id)) or NOT_HELD
        if kind is ControlKind.HOLDER and control.request_id is not None:
            return await operator.holding(str(control.request_id)) or NOT_HELD
        if not control.for_host(self._host):
            return None
        if kind in (ControlKind.DRAIN, ControlKind.RESUME):
            return await operator.set_draining(kind is ControlKind.DRAIN)
        if kind is ControlKind.JOBS:
            return JobsReply(host=self._host, jobs=await operator.jobs(control.jobs or JobsQuery()))
        return None

    async def cancel(self, job_id: str) -> CancelReply:
        await self._cancels.add(job_id)
        record = await self._journal.get(job_id)
        if self._runner.stop_job(job_id, StopReason.CANCEL):
            outcome, status = CancelOutcome.CANCELLING, None
        elif record is not None and record.state in (JobState.FINISHED, JobState.PUBLISHED) and record.result:
            outcome, status = CancelOutcome.FINISHED, record.result.status
        else:
            outcome, status = CancelOutcome.UNKNOWN, None
        log.info("job.cancel", job_id=job_id, host=self._host, outcome=outcome.value)
        return CancelReply(request_id=job_id, host=self._host, outcome=outcome, status=status)

    async def stop(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
