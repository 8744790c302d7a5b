"""The host's broker window: the deliveries it holds un-started never exceed what it can
start now, summed over all of its label consumers (DESIGN.md "Capacity").

Quorum queues have no channel-wide prefetch, so the window is kept here, with *claims*
in the capacity ledger (`CapacityLedger.claim`): room promised, at the label's default
size, to one delivery the broker may send. A label's consumer holds one claim for each
slot of its prefetch window that is empty or holds a delivery not yet started
(`ConsumerClaims`), and it resumes only with the claims it got. A delivery turns its
claim into its job's reservation (`CapacityLedger.redeem`); before the ack that reopens
its slot, the consumer claims room for the next delivery, or cancels first when there is
none. Whatever the limits (`MAX_CONCURRENCY`, `CAPACITY_MAP`, CPU and memory with each
image's default size, warm VMs, draining), the broker can therefore never send a host
more than it can start, and nothing is requeued for want of room.

A delivery that still cannot start (a `size` larger than its label's default claimed) is
*held*: un-acked, waiting for room, never requeued for it. It is started as soon as
room frees; until it has waited `HELD_FIRST_AFTER_S`, other labels keep taking the room
it cannot use, and after that no new claim is given (consumers pause at their next ack)
so that room gathers for it. A hold is bounded by `MAX_HOLD_S`, below RabbitMQ's
`consumer_timeout`: past it the delivery is handed back on purpose, counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from orchestrator.core.imagemap import Resources
from orchestrator.core.logsetup import EventLogger
from orchestrator.host.capacity import CapacityLedger, Reservation

log = EventLogger("orchestrator.host.window")

# A held delivery gets the room that frees first once it has waited this long: until
# then it does not stop other labels from starting what fits (a job of a larger size is
# rare, and most waits end as soon as one job finishes).
HELD_FIRST_AFTER_S = 30.0


@dataclass
class Claimed:
    """The claim a delivery carries while it is handled. Intake redeems it for the job's
    reservation (and sets it to None); what is left goes back to the consumer's window."""

    reservation: Reservation | None


class HostWindow:
    """Claims for this host's label consumers, and the deliveries held waiting for room.

    `listeners` are told after every change of the ledger or of the held deliveries (the
    scheduler resumes consumers on it); `changed()` wakes held deliveries the same way."""

    def __init__(self, ledger: CapacityLedger, default_size: Callable[[str], Resources], *, max_hold_s: float) -> None:
        self._ledger = ledger
        self._default_size = default_size
        self.max_hold_s = max_hold_s
        self._held: dict[str, float] = {}  # job id -> held since (monotonic)
        self._change = asyncio.Event()
        self.closing = False  # the daemon stops: held deliveries are handed back at once
        self.listeners: list[Callable[[], None]] = []
        ledger.listeners.append(self._notify)

    @property
    def ledger(self) -> CapacityLedger:
        return self._ledger

    def claim(self, label: str) -> Reservation | None:
        """Room for one more delivery of `label` at its default size; None when there is
        none, the host drains or stops, or a held delivery is waiting for room first."""
        if self.closing or self.held_first():
            return None
        try:
            size = self._default_size(label)
        except KeyError:  # the label left the image map: its consumer is closing
            return None
        return self._ledger.claim(label, size.cpus, size.memory_mb)

    def release(self, claim: Reservation | None) -> None:
        if claim is not None:
            self._ledger.release(claim)

    # --- held deliveries ------------------------------------------------------------------------
    @property
    def held(self) -> int:
        return len(self._held)

    def held_first(self) -> bool:
        """Whether a held delivery has waited long enough to get the next room first."""
        now = time.monotonic()
        return any(now - since >= HELD_FIRST_AFTER_S for since in self._held.values())

    @contextlib.contextmanager
    def holding(self, job_id: str, label: str, resources: Resources) -> Iterator[None]:
        """Count a delivery as held while the block runs."""
        since = self._held[job_id] = time.monotonic()
        log.info(
            "delivery.held",
            job_id=job_id,
            label=label,
            cpus=resources.cpus,
            memory_mb=resources.memory_mb,
            max_hold_s=self.max_hold_s,
        )
        try:
            yield
        finally:
            del self._held[job_id]
            log.info("delivery.hold_ended", job_id=job_id, label=label, held_s=round(time.monotonic() - since, 3))
            self._notify()

    async def changed(self, timeout_s: float) -> None:
        """Return at the next change of room (or of the held deliveries), or after
        `timeout_s`."""
        change = self._change
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(change.wait(), timeout_s)

    def close(self) -> None:
        """The daemon stops taking work: held deliveries stop waiting."""
        self.closing = True
        self._notify()

    def _notify(self) -> None:
        change, self._change = self._change, asyncio.Event()
        change.set()
        for listener in self.listeners:
            listener()


class ConsumerClaims:
    """The claims of one label's consumer that no delivery carries: one per empty slot of
    the prefetch window of its consumer tag `tag` (None while it does not consume)."""

    def __init__(self, window: HostWindow, label: str) -> None:
        self.window = window
        self.label = label
        self.tag: str | None = None
        self._free: list[Reservation] = []

    @property
    def free(self) -> int:
        return len(self._free)

    def grant(self, claims: list[Reservation], tag: str) -> None:
        """The window of a consumer about to start as `tag`, one claim per slot."""
        self.release_all()
        self.tag = tag
        self._free = list(claims)

    def take(self, tag: str) -> Reservation | None:
        """The claim for a delivery of `tag`: None when the tag's window is closed, or its
        claims are all carried (a reconnection can deliver past them; such a delivery
        starts only in room no claim holds)."""
        if tag != self.tag or not self._free:
            return None
        return self._free.pop()

    def refill(self, returned: Reservation | None, wanted: int) -> bool:
        """Keep `wanted` free claims (the slots that will be empty once a delivery is
        settled), from what a settled delivery gives back first; False when room for
        them is lacking (the consumer must cancel before it settles)."""
        if returned is not None:
            self._free.append(returned)
        while len(self._free) > max(0, wanted):
            self.window.release(self._free.pop())
        while len(self._free) < wanted:
            claim = self.window.claim(self.label)
            if claim is None:
                return False
            self._free.append(claim)
        return True

    def release_all(self) -> None:
        """The consumer stopped (cancel-ok): empty slots promise nothing any more."""
        self.tag = None
        while self._free:
            self.window.release(self._free.pop())
