"""The host's durable job journal (SQLite, WAL).

From the moment a job is acked, its row here is the truth about it on this host. Every
state change — a job entering the journal included — goes through one function,
`_transition`, which checks it against `TRANSITIONS`.

Writes go through one thread that commits in groups: all writes queued while a commit
is running share the next one, so fsync cost is paid once per group, not once per job,
and the event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.messages import JobRequest, JobResult
from orchestrator.core.sqlitedb import GroupCommitDatabase


class JobState(str, enum.Enum):
    ACCEPTED = "accepted"  # acked from the broker; VM not yet running
    RUNNING = "running"  # VM started
    FINISHED = "finished"  # result known and stored, not yet confirmed by the broker
    PUBLISHED = "published"  # result confirmed by the broker
    REQUEUED = "requeued"  # handed back to the broker as a new attempt
    SUPERSEDED = "superseded"  # another host has this attempt (its delivery came twice): not run here


LIVE_STATES = frozenset({JobState.ACCEPTED, JobState.RUNNING})

# `None` is "not in the journal": a job enters it accepted, or answered without running
# (unknown label, stale, rejected). A requeued job comes back only as a later attempt.
TRANSITIONS: dict[JobState | None, frozenset[JobState]] = {
    None: frozenset({JobState.ACCEPTED, JobState.FINISHED}),
    JobState.ACCEPTED: frozenset({JobState.RUNNING, JobState.FINISHED, JobState.REQUEUED, JobState.SUPERSEDED}),
    JobState.RUNNING: frozenset({JobState.FINISHED, JobState.REQUEUED, JobState.SUPERSEDED}),
    JobState.FINISHED: frozenset({JobState.PUBLISHED}),
    JobState.PUBLISHED: frozenset(),
    # A later attempt comes back here to run, or to be answered (stale, cancelled).
    JobState.REQUEUED: frozenset({JobState.ACCEPTED, JobState.FINISHED}),
    JobState.SUPERSEDED: frozenset({JobState.ACCEPTED, JobState.FINISHED}),
}
# States a job leaves only as a later attempt.
HANDED_ON = frozenset({JobState.REQUEUED, JobState.SUPERSEDED})

# What a transition may set besides the state.
_FIELDS = frozenset(
    {
        "label",
        "attempt",
        "request",
        "nonce",
        "vm_name",
        "backend",
        "accepted_at",
        "started_at",
        "finished_at",
        "result",
        "published_at",
    }
)


class InvalidTransition(Exception):
    pass


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    label: str | None
    state: JobState
    attempt: int
    request: JobRequest | None
    nonce: str | None
    vm_name: str | None
    backend: str | None
    accepted_at: float | None
    started_at: float | None
    finished_at: float | None
    result: JobResult | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id       TEXT PRIMARY KEY,
    label        TEXT,
    state        TEXT NOT NULL,
    attempt      INTEGER NOT NULL DEFAULT 1,
    request      TEXT,
    nonce        TEXT,
    vm_name      TEXT,
    backend      TEXT,
    accepted_at  REAL,
    started_at   REAL,
    finished_at  REAL,
    result       TEXT,
    published_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_accepted ON jobs(accepted_at);
CREATE TABLE IF NOT EXISTS cancels (
    job_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS host_state (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

MAX_LISTED_JOBS = 1000

_COLUMNS = (
    "job_id, label, state, attempt, request, nonce, vm_name, backend, accepted_at, started_at, finished_at, result"
)


def _record(row: tuple[Any, ...]) -> JobRecord:
    return JobRecord(
        job_id=row[0],
        label=row[1],
        state=JobState(row[2]),
        attempt=row[3],
        request=JobRequest.model_validate_json(row[4]) if row[4] else None,
        nonce=row[5],
        vm_name=row[6],
        backend=row[7],
        accepted_at=row[8],
        started_at=row[9],
        finished_at=row[10],
        result=JobResult.model_validate_json(row[11]) if row[11] else None,
    )


def _current(conn: sqlite3.Connection, job_id: str) -> tuple[JobState, int] | None:
    row = conn.execute("SELECT state, attempt FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return (JobState(row[0]), row[1]) if row else None


def _transition(conn: sqlite3.Connection, job_id: str, to: JobState, fields: dict[str, Any]) -> None:
    """The one function that changes a job's state (inserting a job new to the journal)."""
    if not set(fields) <= _FIELDS:
        raise ValueError(f"cannot set {sorted(set(fields) - _FIELDS)}")
    found = _current(conn, job_id)
    current = found[0] if found else None
    if to not in TRANSITIONS[current]:
        before = current.value if current else "(not in the journal)"
        raise InvalidTransition(f"job {job_id}: {before} -> {to.value} is not allowed")
    if current in HANDED_ON and found is not None and fields.get("attempt", 0) <= found[1]:
        # The same attempt again is a redelivery of what this host handed on (or left
        # to the host that has it).
        raise InvalidTransition(f"job {job_id}: attempt {fields.get('attempt')} is not later than attempt {found[1]}")
    values = {**fields, "state": to.value}
    if found is None:
        names = ", ".join(["job_id", *values])
        marks = ", ".join("?" for _ in range(len(values) + 1))
        conn.execute(f"INSERT INTO jobs ({names}) VALUES ({marks})", (job_id, *values.values()))
    else:
        assignments = ", ".join(f"{name} = ?" for name in values)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*values.values(), job_id))


def _try_transition(conn: sqlite3.Connection, job_id: str, to: JobState, fields: dict[str, Any]) -> bool:
    """`_transition`, answering False instead of raising when the move is not allowed."""
    try:
        _transition(conn, job_id, to, fields)
    except InvalidTransition:
        return False
    return True


class Journal:
    """Async access to the job table; every method commits before it returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = GroupCommitDatabase(path, schema=_SCHEMA, thread_name=f"journal:{path}")

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)

    async def accept(
        self, request: JobRequest, *, label: str, nonce: str, vm_name: str, backend: str, accepted_at: float
    ) -> bool:
        """Record a job as accepted. False when this host already knows the job (a
        redelivery), unless its earlier attempt was handed back and this is a later one."""
        fields = {
            "label": label,
            "attempt": request.attempt,
            "request": request.model_dump_json(),
            "nonce": nonce,
            "vm_name": vm_name,
            "backend": backend,
            "accepted_at": accepted_at,
            "started_at": None,
            "finished_at": None,
            "result": None,
        }
        return await self._db.submit(lambda conn: _try_transition(conn, request.job_id, JobState.ACCEPTED, fields))

    async def record_answer(self, request: JobRequest | None, result: JobResult, *, label: str | None) -> bool:
        """Store a result for a job this host answers without running (unknown label,
        stale, rejected). False when the job is already known here."""
        now = time.time()
        fields = {
            "label": label,
            "attempt": result.attempt,
            "request": request.model_dump_json() if request else None,
            "accepted_at": now,
            "finished_at": now,
            "result": result.model_dump_json(),
        }
        return await self._db.submit(
            lambda conn: _try_transition(conn, str(result.request_id), JobState.FINISHED, fields)
        )

    async def move(self, job_id: str, to: JobState, **fields: Any) -> None:
        """Move a job this host has; raises `InvalidTransition` for a move that
        `TRANSITIONS` does not allow."""
        if isinstance(fields.get("result"), JobResult):
            fields["result"] = fields["result"].model_dump_json()

        def op(conn: sqlite3.Connection) -> None:
            if _current(conn, job_id) is None:
                raise InvalidTransition(f"job {job_id} is not in the journal")
            _transition(conn, job_id, to, fields)

        await self._db.submit(op)

    async def move_to_vm(self, job_id: str, vm_name: str) -> None:
        """An accepted job goes to another VM than the one journaled (its pool VM could
        not take it: it boots cold). Not a state change; refused once the job runs."""

        def op(conn: sqlite3.Connection) -> None:
            changed = conn.execute(
                "UPDATE jobs SET vm_name = ? WHERE job_id = ? AND state = ?", (vm_name, job_id, JobState.ACCEPTED.value)
            ).rowcount
            if not changed:
                raise InvalidTransition(f"job {job_id} is not accepted-and-not-running: its VM stays")

        await self._db.submit(op)

    async def remember_cancel(self, job_id: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO cancels (job_id, at) VALUES (?, ?)", (job_id, time.time()))

        await self._db.submit(op)

    async def recent_cancels(self, max_age_s: float) -> set[str]:
        """Cancels younger than `max_age_s`; older ones are forgotten (deleted)."""

        def op(conn: sqlite3.Connection) -> set[str]:
            cutoff = time.time() - max_age_s
            conn.execute("DELETE FROM cancels WHERE at < ?", (cutoff,))
            return {row[0] for row in conn.execute("SELECT job_id FROM cancels")}

        return await self._db.submit(op)

    async def get(self, job_id: str) -> JobRecord | None:
        def op(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            return _record(row) if row else None

        return await self._db.submit(op)

    async def in_states(self, states: frozenset[JobState] | set[JobState]) -> list[JobRecord]:
        marks = ", ".join("?" for _ in states)

        def op(conn: sqlite3.Connection) -> list[JobRecord]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY accepted_at",
                [s.value for s in states],
            ).fetchall()
            return [_record(r) for r in rows]

        return await self._db.submit(op)

    async def forget_before(self, cutoff: float) -> list[str]:
        """Delete the rows of jobs that are over here and ended before `cutoff`: their
        result confirmed by the broker, or the job handed to another host. Live jobs and
        results still waiting for the broker are kept whatever their age. Returns the
        job ids forgotten (retention; not a state change: the job leaves the journal)."""
        over = (JobState.PUBLISHED.value, JobState.REQUEUED.value)

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT job_id FROM jobs WHERE state IN (?, ?) AND COALESCE(finished_at, accepted_at, 0) < ?",
                (*over, cutoff),
            ).fetchall()
            conn.executemany("DELETE FROM jobs WHERE job_id = ?", rows)
            return [row[0] for row in rows]

        return await self._db.submit(op)

    async def kept_job_ids(self) -> set[str]:
        """Jobs whose files must stay whatever their age: live, or not yet confirmed."""

        def op(conn: sqlite3.Connection) -> set[str]:
            keep = [s.value for s in (*LIVE_STATES, JobState.FINISHED)]
            marks = ", ".join("?" for _ in keep)
            return {row[0] for row in conn.execute(f"SELECT job_id FROM jobs WHERE state IN ({marks})", keep)}

        return await self._db.submit(op)

    async def recent(
        self,
        *,
        state: JobState | None = None,
        label: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[JobRecord]:
        """This host's jobs, newest first (by when they were accepted or answered)."""
        where: list[str] = ["1"]
        values: list[object] = []
        if state is not None:
            where.append("state = ?")
            values.append(state.value)
        if label is not None:
            where.append("label = ?")
            values.append(label)
        if since is not None:
            where.append("accepted_at >= ?")
            values.append(since)
        query = f"SELECT {_COLUMNS} FROM jobs WHERE {' AND '.join(where)} ORDER BY accepted_at DESC LIMIT ?"
        values.append(min(max(1, limit), MAX_LISTED_JOBS))

        def op(conn: sqlite3.Connection) -> list[JobRecord]:
            return [_record(row) for row in conn.execute(query, values).fetchall()]

        return await self._db.submit(op)

    async def host_flag(self, name: str) -> bool:
        """A host-wide switch that outlives the daemon (drained: `draining`)."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT value FROM host_state WHERE name = ?", (name,)).fetchone()
            return row is not None and row[0] == "1"

        return await self._db.submit(op)

    async def set_host_flag(self, name: str, *, on: bool) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO host_state (name, value) VALUES (?, ?)", (name, "1" if on else "0"))

        await self._db.submit(op)

    async def counts(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

        return await self._db.submit(op)
