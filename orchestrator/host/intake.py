"""Decides what happens to each delivered job message (the `Decision`; `Settler` acts on it).

For a label queue: parse and validate → a redelivery another host holds? → stale? →
resources → the delivery's claim redeemed for the job's reservation (or the delivery held
until room frees: `orchestrator.host.window`) → journal row committed → START (acked, then run). For the unroutable queue: route a legacy or
alias-less message to its label's queue again, or answer "unknown label" with an error
result. Nothing here acks: it only decides.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Container, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage

from hypervisors.base import BackendError
from hypervisors.guest import new_nonce
from hypervisors.statedir import vm_name_for
from orchestrator.core.amqp import ConfirmedPublisher, json_message
from orchestrator.core.fleet import FleetUnavailable
from orchestrator.core.imagemap import ImageEntry, ImageMap, RequestRejected, Resources
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.messages import (
    MAX_MESSAGE_BYTES,
    JobRequest,
    JobResult,
    JobStatus,
    now_utc,
)
from orchestrator.core.requestbody import MalformedRequest, parse_request
from orchestrator.core.topology import REROUTED_HEADER, Topology
from orchestrator.host.capacity import CapacityLedger, Reservation
from orchestrator.host.consumer import Decision, RequeueReason, Verdict, delivery_channel_open, delivery_count
from orchestrator.host.handback import HolderOf
from orchestrator.host.journal import Journal
from orchestrator.host.outbox import ResultOutbox
from orchestrator.host.warmpool import PoolVm, WarmPools
from orchestrator.host.window import Claimed, HostWindow

log = EventLogger("orchestrator.host.intake")


@dataclass(frozen=True)
class AcceptedJob:
    """A journaled job with its capacity held, ready for the runner."""

    request: JobRequest
    label: str
    image: ImageEntry
    resources: Resources
    reservation: Reservation
    nonce: str
    vm_name: str
    accepted_at: float  # when this host took the job (wall clock, as in the journal)
    warm: PoolVm | None = None  # the pool VM it takes (`vm_name` is that VM's)

    @property
    def job_id(self) -> str:
        return self.request.job_id


HAND_BACK_WAIT_S = 30.0
# How long a redelivery waits for the fleet's answers. The host that journaled it may be
# failing over to another broker node itself (the node that lost its ack was often its
# own), and answers once its channels are restored: in the cluster soak 0.5 s let a few
# jobs a run be run twice, 2 s none. A host that is down never answers (it reconciles
# the job itself when it starts, `handback.py`): its redeliveries wait this long.
REDELIVERY_CHECK_S = 2.0
# A held delivery looks at its channel this often besides every change of room: once
# the channel has closed, the broker has it back and holding it is pointless.
HOLD_RECHECK_S = 1.0


async def _never_held(_job_id: str, _timeout_s: float) -> bool:
    return True


@dataclass
class _Delivery:
    """What intake keeps of the delivery it decides on, besides its request."""

    still_ours: Callable[[], bool]  # its channel is open: an ack can still reach the broker
    claimed: Claimed
    count: int  # x-delivery-count


class RunsAJob(Protocol):
    """What intake reads of a job the runner holds (the values of `JobRunner.running`)."""

    job: AcceptedJob


class JobIntake:
    def __init__(
        self,
        *,
        image_map: ImageMap,
        window: HostWindow,
        journal: Journal,
        outbox: ResultOutbox,
        publisher: ConfirmedPublisher,
        topology: Topology,
        host: str,
        backend_of: Callable[[ImageEntry], str],
        start_job: Callable[[AcceptedJob], None],
        cancelled: Container[str] = frozenset(),
        running: Mapping[str, RunsAJob] = MappingProxyType({}),
        wait_released: Callable[[str, float], Awaitable[bool]] | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        pools: WarmPools | None = None,
        holder_of: HolderOf | None = None,
    ) -> None:
        self._image_map = image_map
        self._window = window
        self._ledger: CapacityLedger = window.ledger
        self._journal = journal
        self._outbox = outbox
        self._publisher = publisher
        self._topology = topology
        self._host = host
        self._backend_of = backend_of
        self._start_job = start_job
        self._cancelled = cancelled
        self._running = running
        self._wait_released = wait_released or _never_held
        self._max_message_bytes = max_message_bytes
        self._pools = pools
        self._holder_of = holder_of
        # Journaled here and not yet handed to the runner (the ack comes in between).
        self._starting: dict[str, JobRequest] = {}
        # Redeliveries this host is asking the fleet about (job id → attempt), until
        # decided: what it answers to `holder` meanwhile.
        self.checking: dict[str, int] = {}

    def update_map(self, image_map: ImageMap) -> None:
        """A reloaded image map; jobs already accepted keep the entry they were taken with."""
        self._image_map = image_map

    def handler_for(self, label: str) -> Callable[[AbstractIncomingMessage, Claimed], Awaitable[Decision]]:
        async def handle(message: AbstractIncomingMessage, claimed: Claimed) -> Decision:
            return await self.on_job_message(label, message, claimed)

        return handle

    def _parse(self, message: AbstractIncomingMessage, **where: str) -> JobRequest | Decision:
        try:
            return parse_request(message.body, max_bytes=self._max_message_bytes)
        except MalformedRequest as exc:
            job_id = str(exc.request_id) if exc.request_id else None
            log.warning("job.malformed", **where, reason=str(exc), job_id=job_id)
            return Decision(Verdict.DEAD_LETTER, reason=str(exc), job_id=job_id)

    def _held_here(self, job_id: str) -> JobRequest | None:
        """The request of a job this host holds now, from memory (no journal read)."""
        if job_id in self._starting:
            return self._starting[job_id]
        running = self._running.get(job_id)
        return running.job.request if running is not None else None

    def _copy_of(self, request: JobRequest, known: JobRequest | None, label: str | None) -> Decision:
        """A request for a job this host already knows: acked when it asks for the same
        job, to the DLQ when its id was reused for another; never requeued (it would come
        back at once, again and again, until the delivery limit)."""
        job_id = request.job_id
        differing = known.fields_differing_from(request) if known is not None else []
        if differing:
            log.warning("job.request_id_reused", job_id=job_id, label=label, fields=differing)
            return Decision(
                Verdict.DEAD_LETTER,
                reason=f"request_id {job_id} reused with a different request",
                job_id=job_id,
                result_owed=False,
            )
        log.info("job.duplicate", job_id=job_id, label=label, attempt=request.attempt)
        return Decision(Verdict.DUPLICATE, reason="already known", job_id=job_id)

    async def _copy_of_journaled(self, request: JobRequest, label: str | None) -> Decision:
        """The journal refused the job as already known: compare with what it holds."""
        record = await self._journal.get(request.job_id)
        return self._copy_of(request, record.request if record is not None else None, label)

    async def _answer(self, request: JobRequest, label: str | None, status: JobStatus, summary: str) -> Decision:
        result = JobResult.for_request(request, status=status, summary=summary, host=self._host, label=label)
        if not await self._journal.record_answer(request, result, label=label):
            return await self._copy_of_journaled(request, label)
        log.info("job.answered", job_id=request.job_id, label=label, status=status.value, summary=summary)
        await self._outbox.deliver(result, stored=True)
        return Decision(Verdict.ANSWERED, reason=summary, job_id=request.job_id)

    async def on_job_message(
        self, label: str, message: AbstractIncomingMessage, claimed: Claimed | None = None
    ) -> Decision:
        claimed = claimed if claimed is not None else Claimed(None)
        request = self._parse(message, label=label)
        if isinstance(request, Decision):
            return request
        job_id = request.job_id
        held = self._held_here(job_id)
        if held is not None:
            if request.attempt <= held.attempt:
                return self._copy_of(request, held, label)
            # The runner publishes a job it hands back before it lets go of it here: wait
            # for that (moments), then take the new attempt like any other. Requeueing it
            # instead would bring it straight back, again and again: on a quorum queue
            # each time counts toward the delivery limit, and the job would end in the DLQ.
            if not await self._wait_released(job_id, HAND_BACK_WAIT_S):
                return Decision(
                    Verdict.REQUEUE,
                    reason=f"attempt {held.attempt} is still held here",
                    job_id=job_id,
                    requeue_reason=RequeueReason.ATTEMPT_HELD,
                )
        delivery = _Delivery(functools.partial(delivery_channel_open, message), claimed, delivery_count(message))
        if message.redelivered and job_id not in self.checking:
            self.checking[job_id] = request.attempt
            try:
                return await self._take_redelivery(label, request, delivery)
            finally:
                del self.checking[job_id]
        return await self._take(label, request, delivery)

    async def _take_redelivery(self, label: str, request: JobRequest, delivery: _Delivery) -> Decision:
        """A request delivered again may be another host's already: a host killed before
        its ack reached the broker, or whose ack went down with a broker node, took it
        first (and runs it, or reconciles it when it starts again). Unless this host's
        journal knows the job (then it decides, as for any copy), the fleet is asked."""
        if self._holder_of is not None and await self._journal.get(request.job_id) is None:
            asked_at = time.monotonic()
            try:
                holder = await self._holder_of(request.job_id, request.attempt)
            except FleetUnavailable:
                holder = None  # the broker is away: so is this delivery's channel, most likely
            # Every redelivery costs a question to the fleet (a requeue for want of room
            # is one too): worth a line, and a count in bench/fleet.py.
            log.info(
                "job.redelivery_checked",
                job_id=request.job_id,
                label=label,
                attempt=request.attempt,
                holder=holder.host if holder is not None else None,
                took_ms=round((time.monotonic() - asked_at) * 1000),
            )
            if holder is not None and holder.state != "checking":
                log.info(
                    "job.held_elsewhere",
                    job_id=request.job_id,
                    label=label,
                    attempt=request.attempt,
                    holder=holder.host,
                    holder_state=holder.state,
                )
                return Decision(
                    Verdict.DUPLICATE,
                    reason=f"attempt {holder.attempt} is on host {holder.host}",
                    job_id=request.job_id,
                )
        return await self._take(label, request, delivery)

    async def _take(self, label: str, request: JobRequest, delivery: _Delivery) -> Decision:
        job_id = request.job_id
        if job_id in self._cancelled:
            return await self._answer(request, label, JobStatus.CANCELLED, "cancelled before a host started it")
        if request.deadline is not None and request.deadline < now_utc():
            return await self._answer(
                request,
                label,
                JobStatus.ERROR,
                f"stale: deadline {request.deadline.isoformat()} passed before a host could start the job",
            )
        image = self._image_map.images.get(label)
        if image is None:  # the label left the map (reload) while this was delivered
            return Decision(
                Verdict.REQUEUE,
                reason=f"label {label} is no longer served here",
                job_id=job_id,
                requeue_reason=RequeueReason.LABEL_REMOVED,
            )
        try:
            resources = self._image_map.resources_for(label, request)
            backend = self._backend_of(image)
        except (RequestRejected, BackendError) as exc:
            return await self._answer(request, label, JobStatus.ERROR, str(exc))
        if not self._ledger.fits(resources.cpus, resources.memory_mb):
            return await self._answer(
                request,
                label,
                JobStatus.ERROR,
                f"needs {resources.cpus} CPUs / {resources.memory_mb} MiB but host {self._host} has "
                f"{self._ledger.cpus_total} / {self._ledger.memory_mb_total}: ask for a smaller size",
            )
        warm = self._pools.take(label, resources, job_id) if self._pools is not None else None
        if warm is not None:
            pool_vm, reservation = warm
            vm_name = pool_vm.name
        else:
            pool_vm, vm_name = None, vm_name_for(job_id)
            held = await self._reserve(job_id, label, resources, delivery)
            if isinstance(held, Decision):
                return held
            reservation = held
        if not delivery.still_ours():
            # Its channel closed while it was handled (a broker node went down): the
            # broker has it back for another host, and an ack could not reach it now.
            if pool_vm is not None and self._pools is not None:
                self._pools.give_back(pool_vm, reservation)
            else:
                self._ledger.release(reservation)
            log.info(
                "job.returned",
                job_id=job_id,
                label=label,
                reason="its delivery's channel closed before it was journaled",
            )
            return Decision(
                Verdict.RETURNED,
                reason="channel closed before it was journaled",
                job_id=job_id,
                requeue_reason=RequeueReason.CHANNEL_CLOSED,
            )
        nonce = new_nonce()
        accepted_at = time.time()
        self._starting[job_id] = request
        try:
            fresh = await self._journal.accept(
                request, label=label, nonce=nonce, vm_name=vm_name, backend=backend, accepted_at=accepted_at
            )
        except BaseException:
            self._let_go(reservation, pool_vm)
            raise
        if not fresh:
            self._let_go(reservation, pool_vm)
            return await self._copy_of_journaled(request, label)
        accepted = AcceptedJob(request, label, image, resources, reservation, nonce, vm_name, accepted_at, pool_vm)
        # delivery_count: how often the broker delivered this message before; above 0
        # only after a requeue or a consumer lost with it (tests read it from here).
        log.info(
            "job.accepted",
            job_id=job_id,
            label=label,
            attempt=request.attempt,
            vm=vm_name,
            warm=pool_vm is not None,
            delivery_count=delivery.count,
        )
        return Decision(Verdict.START, job_id=job_id, after_ack=lambda: self._hand_over(accepted))

    async def _reserve(
        self, job_id: str, label: str, resources: Resources, delivery: _Delivery
    ) -> Reservation | Decision:
        """Capacity for a cold job in place of its delivery's claim. Without room (a size
        larger than its label's default, a delivery past its window after a reconnection)
        the delivery is held, un-acked, until room frees: a Decision only when it stops
        waiting for another reason (the host drains or stops, its channel closed, or
        `MAX_HOLD_S` passed)."""
        reservation = await self._reserve_now(job_id, label, resources, delivery.claimed)
        if reservation is not None:
            return reservation
        window = self._window
        deadline = time.monotonic() + window.max_hold_s
        with window.holding(job_id, label, resources):
            while True:
                if window.closing:
                    return Decision(
                        Verdict.REQUEUE, reason="the daemon stops", job_id=job_id, requeue_reason=RequeueReason.STOPPING
                    )
                if self._ledger.draining:
                    return Decision(
                        Verdict.REQUEUE, reason="the host drains", job_id=job_id, requeue_reason=RequeueReason.DRAINING
                    )
                if not delivery.still_ours():
                    log.info(
                        "job.returned",
                        job_id=job_id,
                        label=label,
                        reason="its delivery's channel closed while it was held",
                    )
                    return Decision(
                        Verdict.RETURNED,
                        reason="channel closed while it was held",
                        job_id=job_id,
                        requeue_reason=RequeueReason.CHANNEL_CLOSED,
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    log.warning(
                        "job.held_too_long",
                        job_id=job_id,
                        label=label,
                        max_hold_s=window.max_hold_s,
                        cpus=resources.cpus,
                        memory_mb=resources.memory_mb,
                    )
                    return Decision(
                        Verdict.REQUEUE,
                        reason=f"held {window.max_hold_s:g} s without room (MAX_HOLD_S)",
                        job_id=job_id,
                        requeue_reason=RequeueReason.HELD_TOO_LONG,
                    )
                await window.changed(min(remaining, HOLD_RECHECK_S))
                reservation = await self._reserve_now(job_id, label, resources, delivery.claimed)
                if reservation is not None:
                    return reservation

    async def _reserve_now(self, job_id: str, label: str, resources: Resources, claimed: Claimed) -> Reservation | None:
        """Redeem the claim for the job's reservation, idle pool VMs given up for it when
        that makes room; None (the claim kept) when there is no room now."""
        cpus, memory_mb = resources.cpus, resources.memory_mb
        reservation = self._ledger.redeem(claimed.reservation, job_id, label, cpus, memory_mb)
        if (
            reservation is None
            and self._pools is not None
            and await self._pools.make_room(label, cpus, memory_mb, claim=claimed.reservation)
        ):
            # No await between the pool's last release and this: the room is this job's.
            reservation = self._ledger.redeem(claimed.reservation, job_id, label, cpus, memory_mb)
        if reservation is not None:
            claimed.reservation = None  # it became the job's
        return reservation

    def _let_go(self, reservation: Reservation, pool_vm: PoolVm | None) -> None:
        del self._starting[reservation.holder]
        if pool_vm is not None and self._pools is not None:
            self._pools.give_back(pool_vm, reservation)
        else:
            self._ledger.release(reservation)

    def _hand_over(self, job: AcceptedJob) -> None:
        try:
            self._start_job(job)
        finally:
            del self._starting[job.job_id]

    async def on_unroutable_message(
        self, message: AbstractIncomingMessage, _claimed: Claimed | None = None
    ) -> Decision:
        request = self._parse(message, queue="unroutable")
        if isinstance(request, Decision):
            return request
        rerouted = bool((message.headers or {}).get(REROUTED_HEADER))
        try:
            label = self._image_map.resolve(request.runs_on)
        except RequestRejected as exc:
            return await self._answer(request, request.runs_on, JobStatus.ERROR, str(exc))
        if rerouted:
            return await self._answer(
                request,
                label,
                JobStatus.ERROR,
                f"runs_on: label {label!r} has no queue on this broker (rerouted once already)",
            )
        await self._publisher.publish(
            self._topology.jobs,
            label,
            json_message(
                message.body, headers={**(message.headers or {}), REROUTED_HEADER: 1}, message_id=message.message_id
            ),
        )
        log.info("job.rerouted", job_id=request.job_id, label=label, routing_key=message.routing_key)
        return Decision(Verdict.FORWARDED, job_id=request.job_id)
