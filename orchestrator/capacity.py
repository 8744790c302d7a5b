"""What this host can start now: global, per-label and CPU/memory limits in one ledger.

Consumers ask `can_start` before they consume and `try_reserve` for each delivery; the
ledger tells its listeners after every change so paused consumers can resume.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Reservation:
    job_id: str
    label: str
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
        self.cpus_used = 0
        self.memory_mb_used = 0
        self.draining = False
        self.listeners: list[Callable[[], None]] = []

    @property
    def running(self) -> int:
        return len(self._held)

    def running_for(self, label: str) -> int:
        return self._by_label[label]

    def label_limit(self, label: str) -> int:
        return min(self.per_label.get(label, self.max_concurrency), self.max_concurrency)

    def free_slots(self, label: str) -> int:
        return max(0, min(self.label_limit(label) - self._by_label[label], self.max_concurrency - self.running))

    def fits(self, cpus: int, memory_mb: int) -> bool:
        """Whether a VM of this size could ever run here (an empty host has room)."""
        return cpus <= self.cpus_total and memory_mb <= self.memory_mb_total

    def can_start(self, label: str, cpus: int, memory_mb: int) -> bool:
        return (
            not self.draining
            and self.free_slots(label) > 0
            and self.cpus_used + cpus <= self.cpus_total
            and self.memory_mb_used + memory_mb <= self.memory_mb_total
        )

    def try_reserve(self, job_id: str, label: str, cpus: int, memory_mb: int) -> Reservation | None:
        if job_id in self._held or not self.can_start(label, cpus, memory_mb):
            return None
        reservation = Reservation(job_id, label, cpus, memory_mb)
        self._held[job_id] = reservation
        self._by_label[label] += 1
        self.cpus_used += cpus
        self.memory_mb_used += memory_mb
        self._changed()
        return reservation

    def force_reserve(self, job_id: str, label: str, cpus: int, memory_mb: int) -> Reservation:
        """Hold capacity for a VM that already exists (adopted after a restart), even
        past the limits: it is running whether or not there is room."""
        reservation = Reservation(job_id, label, cpus, memory_mb)
        self._held[job_id] = reservation
        self._by_label[label] += 1
        self.cpus_used += cpus
        self.memory_mb_used += memory_mb
        self._changed()
        return reservation

    def release(self, reservation: Reservation) -> None:
        if self._held.pop(reservation.job_id, None) is None:
            return
        self._by_label[reservation.label] -= 1
        self.cpus_used -= reservation.cpus
        self.memory_mb_used -= reservation.memory_mb
        self._changed()

    def set_draining(self, *, draining: bool) -> None:
        self.draining = draining
        self._changed()

    def running_by_label(self) -> dict[str, int]:
        return {label: n for label, n in self._by_label.items() if n}

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()
