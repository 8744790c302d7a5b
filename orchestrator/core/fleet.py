"""The fleet as one daemon sees it, for the dashboard: every host's newest heartbeat, kept
live from the events exchange (`host.heartbeat.<host>`), and questions to the hosts over
the control exchange (their jobs, where a job's log is, drain and resume), answered the
way `orchestrator hosts`, `jobs`, `logs` and `drain` are.

A host that has sent no heartbeat for `HEARTBEATS_MISSED` times this daemon's
`HEARTBEAT_S` is `unreachable`; one silent for `FORGET_AFTER_S` is forgotten. At most
`max_hosts` hosts are kept (the longest silent goes first), so a broker full of hosts
costs a bounded amount of memory.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage, AbstractRobustChannel, AbstractRobustConnection
from pydantic import BaseModel, ValidationError

from orchestrator.core.amqp import (
    BROKER_ERRORS,
    broker_cancellation_as_error,
    describe_error,
    json_message,
    wait_uncancelled,
)
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import (
    ControlKind,
    ControlMessage,
    Heartbeat,
    JobHolding,
    JobLocation,
    JobsQuery,
    JobsReply,
    UtcDatetime,
    now_utc,
)
from orchestrator.core.topology import Topology

log = EventLogger("orchestrator.core.fleet")

HEARTBEATS_MISSED = 3
FORGET_AFTER_S = 3600.0
MAX_HOSTS = 1024
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # a JOBS answer of 1,000 jobs is well under 1 MiB
ANSWER_TIMEOUT_S = 2.0
LOCATE_TIMEOUT_S = 2.0
REPLY_QUEUE_CANCEL_TIMEOUT_S = 1.0
NOT_HELD = b"null"  # a host's answer to `locate` or `holder` for a job it does not have


_Answer = TypeVar("_Answer", bound=BaseModel)


class FleetUnavailable(Exception):
    """The fleet cannot be asked now (the daemon is starting, or the broker is away)."""


class FleetHost(Heartbeat):
    """A host's newest heartbeat, and when it came (`GET /fleet`)."""

    last_seen: UtcDatetime
    silent_s: float  # since its last heartbeat
    unreachable: bool


@dataclass(frozen=True)
class FleetJobs:
    """What the hosts answered to a JOBS question: their jobs, newest first."""

    replies: list[JobsReply]
    silent: list[str]  # reachable hosts (by their heartbeats) that did not answer in time


@dataclass
class _Seen:
    beat: Heartbeat
    monotonic: float
    wall: datetime


class Fleet:
    def __init__(
        self,
        *,
        topology: Topology,
        host: str,
        heartbeat_s: float,
        own: Callable[[], Heartbeat],
        max_hosts: int = MAX_HOSTS,
    ) -> None:
        self._topology = topology
        self._host = host
        self._own = own  # this host's heartbeat, read live rather than from the broker
        self.unreachable_after_s = HEARTBEATS_MISSED * heartbeat_s
        self._max_hosts = max_hosts
        self._seen: dict[str, _Seen] = {}
        self._channel: AbstractRobustChannel | None = None
        self._control: AbstractExchange | None = None
        self._describe: asyncio.Task[None] | None = None

    async def start(self, connection: AbstractRobustConnection) -> None:
        """Listen to heartbeats, and ask every host to describe itself at once (so the
        view is whole before the first heartbeats come round)."""
        self._channel = await connection.channel()
        events = await self._channel.get_exchange(self._topology.events, ensure=False)
        self._control = await self._channel.get_exchange(self._topology.control, ensure=False)
        heartbeats = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        await heartbeats.bind(events, routing_key="host.heartbeat.*")
        await heartbeats.consume(self._on_heartbeat, no_ack=True)
        self._describe = asyncio.create_task(self._describe_all(), name="fleet-describe")

    def rediscover(self) -> None:
        """Ask every host to describe itself again: after a reconnection, the heartbeats
        sent while this host was away never reached it (its queue went with its
        connection), and questions that wait for every host must know them."""
        if self._channel is not None and (self._describe is None or self._describe.done()):
            self._describe = asyncio.create_task(self._describe_all(), name="fleet-describe")

    async def stop(self) -> None:
        if self._describe is not None:
            self._describe.cancel()
            await asyncio.gather(self._describe, return_exceptions=True)
        channel, self._channel, self._control = self._channel, None, None
        if channel is not None and not channel.is_closed:
            await channel.close()

    # --- the heartbeats ---------------------------------------------------------------------
    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        if len(message.body) > MAX_ANSWER_BYTES:
            return
        try:
            beat = Heartbeat.model_validate_json(message.body)
        except ValidationError as exc:
            log.warning("fleet.heartbeat_malformed", routing_key=message.routing_key, error=str(exc.errors()[:1]))
            return
        self.note(beat)

    def note(self, beat: Heartbeat) -> None:
        """Take `beat` as its host's newest news (a heartbeat, or an answer to a question)."""
        loop = asyncio.get_running_loop()
        self._seen.pop(beat.host, None)  # re-inserted last: the dict stays in order of arrival
        self._seen[beat.host] = _Seen(beat, loop.time(), now_utc())
        while len(self._seen) > self._max_hosts:
            del self._seen[next(iter(self._seen))]  # the longest silent

    def hosts(self) -> list[FleetHost]:
        """Every host heard from (and this one), by name; forgets the long silent."""
        now = asyncio.get_running_loop().time()
        for name in [name for name, seen in self._seen.items() if now - seen.monotonic > FORGET_AFTER_S]:
            del self._seen[name]
        shown = {name: seen for name, seen in self._seen.items() if name != self._host}
        shown[self._host] = _Seen(self._own(), now, now_utc())
        return [
            FleetHost(
                **seen.beat.model_dump(),
                last_seen=seen.wall,
                silent_s=round(now - seen.monotonic, 1),
                unreachable=now - seen.monotonic > self.unreachable_after_s,
            )
            for _, seen in sorted(shown.items())
        ]

    def reachable(self) -> list[str]:
        return [host.host for host in self.hosts() if not host.unreachable]

    def knows(self, host: str) -> bool:
        return host == self._host or host in self._seen

    # --- questions ----------------------------------------------------------------------------
    async def _ask(
        self, question: ControlMessage, *, timeout_s: float, enough: Callable[[list[bytes]], bool]
    ) -> list[bytes]:
        """Publish `question` to every host with a reply queue of its own; the answers
        that came within `timeout_s`, or until `enough` of them have."""
        channel, control = self._channel, self._control
        if channel is None or control is None or channel.is_closed:
            raise FleetUnavailable("not connected to the broker's control exchange yet")
        answers: list[bytes] = []
        complete = asyncio.Event()

        async def on_answer(message: AbstractIncomingMessage) -> None:
            if len(message.body) <= MAX_ANSWER_BYTES:
                answers.append(message.body)
            if enough(answers):
                complete.set()

        try:
            with broker_cancellation_as_error():
                # Not restored after a reconnect: it lives for one question.
                replies = await channel.declare_queue(exclusive=True, auto_delete=True, robust=False)
                tag = await replies.consume(on_answer, no_ack=True)
                message = json_message(question, persistent=False)
                message.reply_to = replies.name
                await control.publish(message, routing_key="")
        except BROKER_ERRORS as exc:
            raise FleetUnavailable(f"cannot ask the fleet: {describe_error(exc)}") from None
        try:
            await asyncio.wait_for(complete.wait(), timeout_s)
        except TimeoutError:
            pass
        finally:
            # The queue goes with its consumer (auto-delete), or with its channel. Waited
            # for only so long: on a channel whose connection dropped, the cancel waits
            # for a reconnection that a daemon stopping (which cancels this question)
            # would never see. Never cancelled: that would close the shared channel.
            try:
                with broker_cancellation_as_error():
                    await wait_uncancelled(replies.cancel(tag), REPLY_QUEUE_CANCEL_TIMEOUT_S)
            except BROKER_ERRORS:
                pass  # gone with its channel
        return list(answers)

    async def _describe_all(self) -> None:
        try:
            question = ControlMessage(kind=ControlKind.DESCRIBE)
            for beat in _parsed(
                Heartbeat, await self._ask(question, timeout_s=ANSWER_TIMEOUT_S, enough=lambda _: False)
            ):
                self.note(beat)
        except FleetUnavailable as exc:
            log.warning("fleet.describe_failed", error=str(exc))

    async def jobs(self, query: JobsQuery) -> FleetJobs:
        """Every reachable host's jobs (`orchestrator jobs`), as soon as all have answered
        or after `ANSWER_TIMEOUT_S`."""
        expected = set(self.reachable())
        bodies = await self._ask(
            ControlMessage(kind=ControlKind.JOBS, jobs=query),
            timeout_s=ANSWER_TIMEOUT_S,
            enough=lambda answers: len(answers) >= len(expected),
        )
        replies = _parsed(JobsReply, bodies)
        answered = {reply.host for reply in replies}
        return FleetJobs(replies=replies, silent=sorted(expected - answered))

    async def set_draining(self, host: str, *, draining: bool) -> Heartbeat | None:
        """Drain or resume `host` (`orchestrator drain --host`); its heartbeat after, or
        None when it did not answer within `ANSWER_TIMEOUT_S`."""
        kind = ControlKind.DRAIN if draining else ControlKind.RESUME
        bodies = await self._ask(ControlMessage(kind=kind, hosts=[host]), timeout_s=ANSWER_TIMEOUT_S, enough=bool)
        for beat in _parsed(Heartbeat, bodies):
            if beat.host == host:
                self.note(beat)
                return beat
        return None

    async def locate(self, job_id: str) -> list[JobLocation]:
        """The hosts that have (or had) the job (`orchestrator logs`), those running it
        first: as soon as a host running it or every reachable host has answered (hosts
        without it answer `null`), or after `LOCATE_TIMEOUT_S`."""
        expected = len(self.reachable())

        def enough(answers: list[bytes]) -> bool:
            return len(answers) >= expected or any(_says_running(body) for body in answers)

        bodies = await self._ask(
            ControlMessage(kind=ControlKind.LOCATE, request_id=job_id),
            timeout_s=LOCATE_TIMEOUT_S,
            enough=enough,
        )
        found = _parsed(JobLocation, [body for body in bodies if body.strip() != b"null"])
        return sorted(found, key=lambda location: not location.running)

    async def holder_of(self, job_id: str, attempt: int, *, timeout_s: float = LOCATE_TIMEOUT_S) -> JobHolding | None:
        """Another host whose journal has `attempt` (or a later one) of the job, or that
        is checking that attempt itself; None once every reachable host has answered
        without one, or after `timeout_s`. Right after start-up the hosts are first
        learnt from the describe round (a restarted host asks before heartbeats): it is
        waited for, or the question would end at this host's own answer."""
        if self._describe is not None and not self._describe.done():
            await asyncio.wait({self._describe}, timeout=2 * ANSWER_TIMEOUT_S)  # it ends by itself within one
        expected = len(self.reachable())

        def holding(body: bytes) -> JobHolding | None:
            if body.strip() == NOT_HELD:
                return None
            found = _parsed(JobHolding, [body])
            if found and found[0].host != self._host and found[0].attempt >= attempt:
                return found[0]
            return None

        def enough(answers: list[bytes]) -> bool:
            return len(answers) >= expected or holding(answers[-1]) is not None

        bodies = await self._ask(
            ControlMessage(kind=ControlKind.HOLDER, request_id=job_id), timeout_s=timeout_s, enough=enough
        )
        held = [found for found in map(holding, bodies) if found is not None]
        # A host that ran or journaled it outranks one still checking.
        return min(held, key=lambda found: found.state == "checking", default=None)


def _parsed(model: type[_Answer], bodies: list[bytes]) -> list[_Answer]:
    """The answers that are what was asked for; another version's odd answer is skipped."""
    parsed = []
    for body in bodies:
        try:
            parsed.append(model.model_validate_json(body))
        except ValidationError as exc:
            log.warning("fleet.answer_malformed", model=model.__name__, error=str(exc.errors()[:1]))
    return parsed


def _says_running(body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("running") is True
