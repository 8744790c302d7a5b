"""The host's durable job journal (SQLite, WAL).

From the moment a job is acked, its row here is the truth about it on this host. Every
state change goes through `Journal.move`, which checks it against `TRANSITIONS`.

Writes go through one thread that commits in groups: all writes queued while a commit
is running share the next one, so fsync cost is paid once per group, not once per job,
and the event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import enum
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.messages import JobRequest, JobResult

T = TypeVar("T")


class JobState(str, enum.Enum):
    ACCEPTED = "accepted"  # acked from the broker; VM not yet running
    RUNNING = "running"  # VM started
    FINISHED = "finished"  # result known and stored, not yet confirmed by the broker
    PUBLISHED = "published"  # result confirmed by the broker
    REQUEUED = "requeued"  # handed back to the broker as a new attempt


LIVE_STATES = frozenset({JobState.ACCEPTED, JobState.RUNNING})

TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.ACCEPTED: frozenset({JobState.RUNNING, JobState.FINISHED, JobState.REQUEUED}),
    JobState.RUNNING: frozenset({JobState.FINISHED, JobState.REQUEUED}),
    JobState.FINISHED: frozenset({JobState.PUBLISHED}),
    JobState.PUBLISHED: frozenset(),
    JobState.REQUEUED: frozenset({JobState.ACCEPTED}),
}


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
CREATE TABLE IF NOT EXISTS cancels (
    job_id TEXT PRIMARY KEY,
    at     REAL NOT NULL
);
"""

_COLUMNS = (
    "job_id, label, state, attempt, request, nonce, vm_name, backend, "
    "accepted_at, started_at, finished_at, result"
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


class _GroupCommitter:
    """One thread owning the connection; runs queued operations in shared transactions."""

    def __init__(self, path: Path) -> None:
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        self._pending: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self._thread.start()

    def submit(self, op: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._wake:
            if self._closing:
                raise RuntimeError("journal is closed")
            self._pending.append((op, future, loop))
            self._wake.notify()
        return future

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closing:
                    break
            outcomes: list[tuple[bool, Any]] = []
            self._conn.execute("BEGIN IMMEDIATE")
            for op, _, _ in batch:
                self._conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(self._conn)))
                    self._conn.execute("RELEASE op")
                except Exception as exc:  # one failing op must not undo the others
                    self._conn.execute("ROLLBACK TO op")
                    self._conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                outcomes = [(False, exc)] * len(batch)
            for (ok, value), (_, future, loop) in zip(outcomes, batch):
                loop.call_soon_threadsafe(_settle, future, ok, value)
        self._conn.close()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()


def _settle(future: asyncio.Future[Any], ok: bool, value: Any) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


class Journal:
    """Async access to the job table; every method commits before it returns."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = _GroupCommitter(path)

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)

    async def accept(
        self, request: JobRequest, *, label: str, nonce: str, vm_name: str, backend: str
    ) -> bool:
        """Record a job as accepted. False when this host already knows the job (a
        redelivery), unless its earlier attempt was handed back and this is a later one."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT state, attempt FROM jobs WHERE job_id = ?", (request.job_id,)
            ).fetchone()
            values = (
                label, JobState.ACCEPTED.value, request.attempt, request.model_dump_json(),
                nonce, vm_name, backend, time.time(), request.job_id,
            )
            if row is None:
                conn.execute(
                    "INSERT INTO jobs (label, state, attempt, request, nonce, vm_name, backend, accepted_at, job_id)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
                return True
            if row[0] == JobState.REQUEUED.value and request.attempt > row[1]:
                conn.execute(
                    "UPDATE jobs SET label=?, state=?, attempt=?, request=?, nonce=?, vm_name=?, backend=?,"
                    " accepted_at=?, started_at=NULL, finished_at=NULL, result=NULL WHERE job_id=?",
                    values,
                )
                return True
            return False

        return await self._db.submit(op)

    async def record_answer(self, request: JobRequest | None, result: JobResult, *, label: str | None) -> bool:
        """Store a result for a job this host answers without running (unknown label,
        stale, rejected). False when the job is already known here."""

        def op(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO jobs (job_id, label, state, attempt, request, accepted_at, finished_at, result)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    str(result.request_id), label, JobState.FINISHED.value, result.attempt,
                    request.model_dump_json() if request else None, time.time(), time.time(),
                    result.model_dump_json(),
                ),
            )
            return cursor.rowcount == 1

        return await self._db.submit(op)

    async def move(self, job_id: str, to: JobState, **fields: Any) -> None:
        """The one way a job changes state; raises `InvalidTransition` for a move that
        `TRANSITIONS` does not allow."""
        allowed_fields = {"started_at", "finished_at", "result", "published_at", "attempt"}
        if not set(fields) <= allowed_fields:
            raise ValueError(f"cannot set {sorted(set(fields) - allowed_fields)}")
        if isinstance(fields.get("result"), JobResult):
            fields["result"] = fields["result"].model_dump_json()

        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
            if row is None:
                raise InvalidTransition(f"job {job_id} is not in the journal")
            current = JobState(row[0])
            if to not in TRANSITIONS[current]:
                raise InvalidTransition(f"job {job_id}: {current.value} -> {to.value} is not allowed")
            assignments = ", ".join(["state = ?"] + [f"{k} = ?" for k in fields])
            conn.execute(
                f"UPDATE jobs SET {assignments} WHERE job_id = ?",
                (to.value, *fields.values(), job_id),
            )

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

    async def counts(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())

        return await self._db.submit(op)


