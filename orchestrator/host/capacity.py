"""What this host can start now: global, per-label and CPU/memory limits in one ledger.

Three kinds of reservation share the limits (`Holding`): jobs, warm pool VMs, and
*claims*. A claim is room promised to one delivery the broker may send: a label's
consumer holds one claim per slot of its prefetch window that is empty or holds a
delivery not yet started (`orchestrator.host.window`), so the deliveries a host holds
un-started never exceed what it can start now, summed over all its labels. A delivery
turns its claim into its job's reservation (`redeem`). The ledger tells its listeners
after every change so paused consumers can resume and held deliveries look again.

Warm pool VMs (`orchestrator.host.warmpool`) hold capacity like jobs do: a slot, their label's
slot, their vCPUs and memory. While a pool VM is idle it is *yieldable*: a job can take
it (its reservation becomes the job's) or have it given up to make room. So `claim`,
which decides what consumers may be sent, counts idle pool VMs as room, while
`redeem`, `try_reserve` and `reserve_warm` count them as held: a job that needs their
room waits until the pool has destroyed them (`WarmPools.make_room`), and VMs never
outnumber slots.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace


class Holding(str, enum.Enum):
    JOB = "job"  # a job accepted here (its VM may not have started yet)
    WARM = "warm"  # a pool VM no job has taken
    CLAIM = "claim"  # room promised to a delivery the broker may send


@dataclass(frozen=True)
class Reservation:
    holder: str  # the job id, a pool VM's name, or a claim's own id
    label: str
    cpus: int
    memory_mb: int
    kind: Holding = Holding.JOB

    @property
    def warm(self) -> bool:
        return self.kind is Holding.WARM

    @property
    def claim(self) -> bool:
        return self.kind is Holding.CLAIM


@dataclass(frozen=True)
class _Used:
    slots: int
    cpus: int
    memory_mb: int


class CapacityLedger:
    def __init__(
        self,
        *,
        max_concurrency: int,
        per_label: Mapping[str, int],
        cpus: int,
        memory_mb: int,
    ) -> None:
        self.max_concurrency = max_concurrency
        self.per_label = dict(per_label)
        self.cpus_total = cpus
        self.memory_mb_total = memory_mb
        self._held: dict[str, Reservation] = {}
        self._by_label: Counter[str] = Counter()
        self._yieldable: dict[str, Reservation] = {}  # idle pool VMs, by name
        self._claims: dict[str, Reservation] = {}
        self._claim_ids = itertools.count(1)
        self.cpus_used = 0  # jobs and pool VMs (claims are promises, not use)
        self.memory_mb_used = 0
        self.draining = False
        self.listeners: list[Callable[[], None]] = []

    # --- what is held ----------------------------------------------------------------------
    @property
    def running(self) -> int:
        """Jobs holding capacity (pool VMs not counted: see `warm`)."""
        return sum(1 for r in self._held.values() if r.kind is Holding.JOB)

    @property
    def warm(self) -> int:
        """Pool VMs holding capacity that no job has taken."""
        return sum(1 for r in self._held.values() if r.warm)

    def holds_job(self, job_id: str) -> bool:
        """The job holds capacity here: accepted, whether or not its VM has started yet."""
        held = self._held.get(job_id)
        return held is not None and held.kind is Holding.JOB

    def running_for(self, label: str) -> int:
        return sum(1 for r in self._held.values() if r.label == label and r.kind is Holding.JOB)

    def running_by_label(self) -> dict[str, int]:
        counts = Counter(r.label for r in self._held.values() if r.kind is Holding.JOB)
        return {label: n for label, n in counts.items() if n}

    @property
    def claimed(self) -> int:
        """Claims outstanding: deliveries this host's consumers may be sent or hold un-started."""
        return len(self._claims)

    def warm_by_label(self) -> dict[str, int]:
        counts = Counter(r.label for r in self._held.values() if r.warm)
        return {label: n for label, n in counts.items() if n}

    def label_limit(self, label: str) -> int:
        return min(self.per_label.get(label, self.max_concurrency), self.max_concurrency)

    def fits(self, cpus: int, memory_mb: int) -> bool:
        """Whether a VM of this size could ever run here (an empty host has room)."""
        return cpus <= self.cpus_total and memory_mb <= self.memory_mb_total

    # --- room for a job (idle pool VMs count as room) ---------------------------------------
    def _used(self, label: str, ignoring: Iterable[Reservation]) -> tuple[_Used, int]:
        """Slots, vCPUs and memory held (claims included) but for `ignoring`, and
        `label`'s slots the same way."""
        ignored = {r.holder: r for r in ignoring if self._held.get(r.holder) == r}.values()
        claims = self._claims.values()
        used = _Used(
            len(self._held) - len(ignored),
            self.cpus_used + sum(r.cpus for r in claims) - sum(r.cpus for r in ignored),
            self.memory_mb_used + sum(r.memory_mb for r in claims) - sum(r.memory_mb for r in ignored),
        )
        return used, self._by_label[label] - sum(1 for r in ignored if r.label == label)

    def _room(self, label: str, cpus: int, memory_mb: int, ignoring: Iterable[Reservation] = ()) -> bool:
        used, label_used = self._used(label, ignoring)
        return (
            label_used < self.label_limit(label)
            and used.slots < self.max_concurrency
            and used.cpus + cpus <= self.cpus_total
            and used.memory_mb + memory_mb <= self.memory_mb_total
        )

    def room_without(self, label: str, cpus: int, memory_mb: int, released: Iterable[Reservation]) -> bool:
        """Whether a job would have room once `released` (idle pool VMs, the job's own
        claim) are given up."""
        return not self.draining and self._room(label, cpus, memory_mb, released)

    # --- claims: room promised to deliveries ---------------------------------------------------
    def claim(self, label: str, cpus: int, memory_mb: int) -> Reservation | None:
        """Promise room for one delivery of `label` of this size, beside every job, claim
        and pool VM that is not idle (an idle pool VM is room: a job takes it or has it
        given up); None when there is none, or the host drains."""
        if self.draining or not self._room(label, cpus, memory_mb, self._yieldable.values()):
            return None
        return self._add(Reservation(f"claim-{next(self._claim_ids)}", label, cpus, memory_mb, Holding.CLAIM))

    def redeem(
        self, claim: Reservation | None, job_id: str, label: str, cpus: int, memory_mb: int
    ) -> Reservation | None:
        """Hold capacity for a job in place of its delivery's `claim` (which goes, when
        the job gets room): the job may be larger than what was claimed, so room is
        checked with the claim given back and idle pool VMs counted as held. None when
        there is no room without giving pool VMs up first."""
        ignoring = [claim] if claim is not None else []
        if job_id in self._held or self.draining or not self._room(label, cpus, memory_mb, ignoring):
            return None
        if claim is not None and self._held.get(claim.holder) == claim:
            self._remove(claim)
        return self._add(Reservation(job_id, label, cpus, memory_mb))

    # --- reservations -------------------------------------------------------------------------
    def try_reserve(self, job_id: str, label: str, cpus: int, memory_mb: int) -> Reservation | None:
        """Hold capacity for a job, counting idle pool VMs and claims as held: None when
        there is no room without giving some up first."""
        return self.redeem(None, job_id, label, cpus, memory_mb)

    def force_reserve(self, job_id: str, label: str, cpus: int, memory_mb: int) -> Reservation:
        """Hold capacity for a VM that already exists (adopted after a restart), even
        past the limits: it is running whether or not there is room."""
        return self._add(Reservation(job_id, label, cpus, memory_mb))

    def reserve_warm(self, vm_name: str, label: str, cpus: int, memory_mb: int) -> Reservation | None:
        """Hold capacity for a new pool VM (idle, so yieldable); None when there is no room
        (pool VMs never make room for each other). Claims do not stand in its way: a
        pool VM is given up or taken when a delivery needs its room, so a label whose
        consumer holds claims on an empty queue does not keep the pools empty."""
        if vm_name in self._held or self.draining or not self._room(label, cpus, memory_mb, self._claims.values()):
            return None
        reservation = self._add(Reservation(vm_name, label, cpus, memory_mb, Holding.WARM))
        self._yieldable[vm_name] = reservation
        return reservation

    def take_warm(self, pool: Reservation, job_id: str) -> Reservation:
        """A job takes an idle pool VM: its capacity becomes the job's, unchanged."""
        self._remove(pool)
        return self._add(replace(pool, holder=job_id, kind=Holding.JOB))

    def return_warm(self, job: Reservation, vm_name: str) -> Reservation:
        """Undo `take_warm` (the job turned out to be known here already)."""
        self._remove(job)
        reservation = self._add(replace(job, holder=vm_name, kind=Holding.WARM))
        self._yieldable[vm_name] = reservation
        return reservation

    def idle_pool(self) -> list[Reservation]:
        return list(self._yieldable.values())

    def release(self, reservation: Reservation) -> None:
        if self._held.get(reservation.holder) != reservation:
            return
        self._remove(reservation)
        self._changed()

    def set_draining(self, *, draining: bool) -> None:
        self.draining = draining
        self._changed()

    def _add(self, reservation: Reservation) -> Reservation:
        self._held[reservation.holder] = reservation
        self._by_label[reservation.label] += 1
        if reservation.claim:
            self._claims[reservation.holder] = reservation
        else:
            self.cpus_used += reservation.cpus
            self.memory_mb_used += reservation.memory_mb
        self._changed()
        return reservation

    def _remove(self, reservation: Reservation) -> None:
        del self._held[reservation.holder]
        self._yieldable.pop(reservation.holder, None)
        self._by_label[reservation.label] -= 1
        if self._claims.pop(reservation.holder, None) is None:
            self.cpus_used -= reservation.cpus
            self.memory_mb_used -= reservation.memory_mb

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()
