"""Decides what happens to each delivered job message (the `Decision`; `Settler` acts on it).

For a label queue: parse and validate → stale? → resources → reserve capacity → journal
row committed → START (acked, then run). For the unroutable queue: route a legacy or
alias-less message to its label's queue again, or answer "unknown label" with an error
result. Nothing here acks: it only decides.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Container
from dataclasses import dataclass

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from hypervisors.base import BackendError
from hypervisors.guest import new_nonce
from orchestrator.amqp import ConfirmedPublisher, json_message
from orchestrator.capacity import CapacityLedger, Reservation
from orchestrator.consumer import Decision, Verdict
from orchestrator.imagemap import ImageEntry, ImageMap, RequestRejected, Resources
from orchestrator.journal import Journal
from orchestrator.logsetup import EventLogger
from orchestrator.messages import JobRequest, JobResult, JobStatus, now_utc
from orchestrator.outbox import ResultOutbox
from orchestrator.statedir import vm_name_for
from orchestrator.topology import REROUTED_HEADER, Topology

log = EventLogger("orchestrator.intake")


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

    @property
    def job_id(self) -> str:
        return self.request.job_id


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "(message)"
        parts.append(f"{where}: {error['msg']}")
    return "invalid job request: " + "; ".join(parts)


def parse_request(body: bytes) -> JobRequest:
    """Raises ValueError with a reason fit for the DLQ header."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    try:
        return JobRequest.model_validate(data)
    except ValidationError as exc:
        raise ValueError(describe_validation_error(exc)) from None


def request_id_of(body: bytes) -> uuid.UUID | None:
    """The request id of a message that failed validation, when one can be read."""
    try:
        return uuid.UUID(str(json.loads(body)["request_id"]))
    except Exception:
        return None


class JobIntake:
    def __init__(
        self,
        *,
        image_map: ImageMap,
        ledger: CapacityLedger,
        journal: Journal,
        outbox: ResultOutbox,
        publisher: ConfirmedPublisher,
        topology: Topology,
        host: str,
        backend_of: Callable[[ImageEntry], str],
        start_job: Callable[[AcceptedJob], None],
        cancelled: Container[str] = frozenset(),
    ) -> None:
        self._image_map = image_map
        self._ledger = ledger
        self._journal = journal
        self._outbox = outbox
        self._publisher = publisher
        self._topology = topology
        self._host = host
        self._backend_of = backend_of
        self._start_job = start_job
        self._cancelled = cancelled

    def update_map(self, image_map: ImageMap) -> None:
        """A reloaded image map; jobs already accepted keep the entry they were taken with."""
        self._image_map = image_map

    def handler_for(self, label: str) -> Callable[[AbstractIncomingMessage], object]:
        async def handle(message: AbstractIncomingMessage) -> Decision:
            return await self.on_job_message(label, message)

        return handle

    async def _answer(self, request: JobRequest, label: str | None, status: JobStatus, summary: str) -> Decision:
        result = JobResult.for_request(request, status=status, summary=summary, host=self._host, label=label)
        if not await self._journal.record_answer(request, result, label=label):
            return Decision(Verdict.DUPLICATE, reason="already known", job_id=request.job_id)
        log.info("job.answered", job_id=request.job_id, label=label, status=status.value, summary=summary)
        await self._outbox.deliver(result, stored=True)
        return Decision(Verdict.ANSWERED, reason=summary, job_id=request.job_id)

    async def on_job_message(self, label: str, message: AbstractIncomingMessage) -> Decision:
        try:
            request = parse_request(message.body)
        except ValueError as exc:
            log.warning("job.malformed", label=label, reason=str(exc), job_id=str(request_id_of(message.body)))
            return Decision(Verdict.DEAD_LETTER, reason=str(exc))
        job_id = request.job_id
        if job_id in self._cancelled:
            return await self._answer(request, label, JobStatus.CANCELLED, "cancelled before a host started it")
        if request.deadline is not None and request.deadline < now_utc():
            return await self._answer(request, label, JobStatus.ERROR, f"stale: deadline {request.deadline.isoformat()} passed before a host could start the job")
        image = self._image_map.images.get(label)
        if image is None:  # the label left the map (reload) while this was delivered
            return Decision(Verdict.REQUEUE, reason=f"label {label} is no longer served here", job_id=job_id)
        try:
            resources = self._image_map.resources_for(label, request)
            backend = self._backend_of(image)
        except (RequestRejected, BackendError) as exc:
            return await self._answer(request, label, JobStatus.ERROR, str(exc))
        if not self._ledger.fits(resources.cpus, resources.memory_mb):
            return await self._answer(
                request, label, JobStatus.ERROR,
                f"needs {resources.cpus} CPUs / {resources.memory_mb} MiB but host {self._host} has "
                f"{self._ledger.cpus_total} / {self._ledger.memory_mb_total}: ask for a smaller size",
            )
        reservation = self._ledger.try_reserve(job_id, label, resources.cpus, resources.memory_mb)
        if reservation is None:
            return Decision(Verdict.REQUEUE, reason="no capacity now", job_id=job_id)
        nonce = new_nonce()
        vm_name = vm_name_for(job_id)
        accepted_at = time.time()
        try:
            fresh = await self._journal.accept(
                request, label=label, nonce=nonce, vm_name=vm_name, backend=backend, accepted_at=accepted_at
            )
        except BaseException:
            self._ledger.release(reservation)
            raise
        if not fresh:
            self._ledger.release(reservation)
            log.info("job.duplicate", job_id=job_id, label=label)
            return Decision(Verdict.DUPLICATE, reason="already known", job_id=job_id)
        accepted = AcceptedJob(request, label, image, resources, reservation, nonce, vm_name, accepted_at)
        log.info("job.accepted", job_id=job_id, label=label, attempt=request.attempt)
        return Decision(Verdict.START, job_id=job_id, after_ack=lambda: self._start_job(accepted))

    async def on_unroutable_message(self, message: AbstractIncomingMessage) -> Decision:
        try:
            request = parse_request(message.body)
        except ValueError as exc:
            log.warning("job.malformed", queue="unroutable", reason=str(exc), job_id=str(request_id_of(message.body)))
            return Decision(Verdict.DEAD_LETTER, reason=str(exc))
        rerouted = bool((message.headers or {}).get(REROUTED_HEADER))
        try:
            label = self._image_map.resolve(request.runs_on)
        except RequestRejected as exc:
            return await self._answer(request, request.runs_on, JobStatus.ERROR, str(exc))
        if rerouted:
            return await self._answer(
                request, label, JobStatus.ERROR,
                f"runs_on: label {label!r} has no queue on this broker (rerouted once already)",
            )
        await self._publisher.publish(
            self._topology.jobs,
            label,
            json_message(message.body, headers={**(message.headers or {}), REROUTED_HEADER: 1}, message_id=message.message_id),
        )
        log.info("job.rerouted", job_id=request.job_id, label=label, routing_key=message.routing_key)
        return Decision(Verdict.FORWARDED, job_id=request.job_id)
