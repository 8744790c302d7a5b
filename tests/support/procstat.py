"""What a process uses, read from /proc outside it, and rlimits for a child: tests and
benches measure a daemon this way, never through the daemon's own account."""

from __future__ import annotations

import asyncio
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} for pid {pid}")


def rss_bytes(pid: int) -> int:
    return _status_bytes(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    """VmHWM: the most RSS the process has had since it started or since `reset_peak_rss`
    (the kernel's own high-water mark: no spike between two samples is missed)."""
    return _status_bytes(pid, "VmHWM")


def reset_peak_rss(pid: int) -> None:
    """Start the process's VmHWM over from its RSS now (Linux 4.0+, `clear_refs` 5), so
    `peak_rss_bytes` then measures one phase, not the start-up."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used."""
    # The command name (field 2) may hold spaces: count fields after its closing paren.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def open_files_limit(pid: int) -> tuple[int, int]:
    """The soft and hard RLIMIT_NOFILE, as /proc/<pid>/limits shows them."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise ValueError(f"no open-files limit for pid {pid}")


def with_limits(*, nofile: tuple[int, int], address_space: int = 4 * GIB) -> Callable[[], None]:
    """A `preexec_fn` that caps the child's descriptors and address space, so a daemon
    that regresses fails its test instead of exhausting the machine."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return apply


def ensure_own_descriptors(count: int) -> bool:
    """Raise this process's soft RLIMIT_NOFILE to at least `count` if its hard limit
    allows (a client holding many connections needs them); False if it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        if hard != resource.RLIM_INFINITY and hard < count:
            return False
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))
    return True


@dataclass(frozen=True)
class Use:
    fds: int
    rss_bytes: int


def use_of(pid: int) -> Use:
    return Use(open_fds(pid), rss_bytes(pid))


class PeakUse:
    """The most descriptors and the most RSS a process had, sampled every `interval_s`
    from now until `stop()`."""

    def __init__(self, pid: int, *, interval_s: float = 0.02) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak = use_of(pid)
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            try:
                now = use_of(self.pid)
            except FileNotFoundError:
                return  # the process has exited: its peak is what was seen
            self.peak = Use(max(self.peak.fds, now.fds), max(self.peak.rss_bytes, now.rss_bytes))
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> Use:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.peak
