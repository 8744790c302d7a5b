"""What a host keeps, and for how long: nothing grows without bound.

`RETENTION_DAYS` after a job ended here (its result confirmed by the broker, or the job
handed to another host), its journal row and its console log (`logs/<job>.console` with
its `.cut` sidecar) are deleted. A running job, or one whose result the broker has not
confirmed yet, is never touched whatever its age. The sweep runs at start and hourly;
the dead-letter queue has its own bound (`DLQ_MAX_LENGTH`, in `topology`).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from hypervisors.statedir import StateDir
from orchestrator.core.logsetup import EventLogger
from orchestrator.host.journal import Journal

log = EventLogger("orchestrator.host.retention")

DAY_S = 24 * 3600


@dataclass(frozen=True)
class Swept:
    jobs: int
    logs: int
    bytes_freed: int


def _job_id_of_log(path: Path) -> str | None:
    name = path.name
    for suffix in (".console", ".console.cut"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _delete_old_logs(logs: Path, *, keep: set[str], forgotten: set[str], cutoff: float) -> tuple[int, int]:
    """Logs of forgotten jobs, and logs older than `cutoff` of jobs the journal does not
    keep (answered without a VM, or from before a journal was lost)."""
    count = freed = 0
    if not logs.is_dir():
        return 0, 0
    for entry in os.scandir(logs):
        job_id = _job_id_of_log(Path(entry.path))
        if job_id is None or job_id in keep:
            continue
        stat = entry.stat(follow_symlinks=False)
        if job_id in forgotten or stat.st_mtime < cutoff:
            os.unlink(entry.path)
            count += entry.name.endswith(".console")
            freed += stat.st_size
    return count, freed


async def sweep(
    journal: Journal, state: StateDir, *, retention_days: float, running: set[str], now: float | None = None
) -> Swept:
    """Forget jobs that ended more than `retention_days` ago and delete their logs."""
    cutoff = (time.time() if now is None else now) - retention_days * DAY_S
    forgotten = set(await journal.forget_before(cutoff))
    keep = (await journal.kept_job_ids()) | running
    logs, freed = await asyncio.to_thread(_delete_old_logs, state.logs, keep=keep, forgotten=forgotten, cutoff=cutoff)
    swept = Swept(len(forgotten), logs, freed)
    if forgotten or logs:
        log.info(
            "retention.swept",
            jobs=swept.jobs,
            logs=swept.logs,
            bytes_freed=swept.bytes_freed,
            retention_days=retention_days,
        )
    return swept


def directory_bytes(root: Path) -> int:
    """Bytes of the files under `root` (blocking; for /metrics, measured once a minute)."""
    total = 0
    stack = [root]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
            except OSError:
                continue
    return total
