"""The noop backend with what a test counts on top of its own `alive`/`peak_alive`."""

from __future__ import annotations

from collections import Counter

from hypervisors.base import VmSpec
from hypervisors.noop import NoopHypervisor


class CountingNoop(NoopHypervisor):
    """Counts VM starts per job, and the most VMs alive at once per label (the job's
    `LABEL` env value; jobs without one are not counted per label)."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: Counter[str] = Counter()
        self.peak_by_label: Counter[str] = Counter()

    async def start(self, spec: VmSpec) -> None:
        await super().start(spec)
        self.starts[spec.job_id] += 1
        label = spec.env.get("LABEL")
        if label is not None:
            alive = sum(vm.alive and vm.spec.env.get("LABEL") == label for vm in self._vms.values())
            self.peak_by_label[label] = max(self.peak_by_label[label], alive)
