"""The bridge's durable state (SQLite, WAL): deliveries, runs, commit statuses, heads.

- A delivery is written here before the webhook is answered 202, and marked done once
  every job it asked for is published: a crash in between resumes it at the next start.
- A run is one job for one commit and ref. Its request id is derived from what
  identifies the work (forge, repository, ref or pull request, commit, job name), so a
  redelivered webhook, a crash between publish and journal, or a catch-up pass that
  finds the same head can never make a second job.
- The last status per (repository, commit, context) is kept, and moves only forward —
  queued, then running, then a final state — so a late `pending` never overwrites a
  result. Each step waits in an outbox until the forge took it, and the steps of one
  context are sent in order (the commit shows queued, running, then the result). A
  sender claims a context before it sends (`status_claims`, with a lease): `forge
  catch-up` and `forge rerun` send from the same journal as the running service, and
  two senders of one context would otherwise both take its oldest step, the slower
  one putting an older state on the commit after a newer one.
- The head of each branch and open pull request, as last seen (catch-up).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core.sqlitedb import GroupCommitDatabase
from orchestrator.forge.base import CommitStatus, Repo, StatusState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    key         TEXT PRIMARY KEY,
    forge       TEXT NOT NULL,
    repo        TEXT NOT NULL,
    source      TEXT NOT NULL,
    event       TEXT NOT NULL,
    received_at REAL NOT NULL,
    done_at     REAL,
    outcome     TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_open ON deliveries(done_at);
CREATE TABLE IF NOT EXISTS runs (
    request_id   TEXT PRIMARY KEY,
    forge        TEXT NOT NULL,
    repo         TEXT NOT NULL,
    repo_json    TEXT NOT NULL,
    commit_sha   TEXT NOT NULL,
    ref_key      TEXT NOT NULL,
    job_name     TEXT NOT NULL,
    context      TEXT NOT NULL,
    request      TEXT NOT NULL,
    created_at   REAL NOT NULL,
    published_at REAL
);
CREATE INDEX IF NOT EXISTS runs_ref ON runs(forge, repo, ref_key);
CREATE TABLE IF NOT EXISTS statuses (
    forge       TEXT NOT NULL,
    repo        TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    context     TEXT NOT NULL,
    repo_json   TEXT NOT NULL,
    state       TEXT NOT NULL,
    description TEXT NOT NULL,
    target_url  TEXT,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (forge, repo, commit_sha, context)
);
CREATE TABLE IF NOT EXISTS status_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    forge       TEXT NOT NULL,
    repo_json   TEXT NOT NULL,
    commit_sha  TEXT NOT NULL,
    context     TEXT NOT NULL,
    state       TEXT NOT NULL,
    description TEXT NOT NULL,
    target_url  TEXT,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try_at REAL NOT NULL DEFAULT 0,
    error       TEXT
);
CREATE TABLE IF NOT EXISTS status_claims (
    forge         TEXT NOT NULL,
    repo_json     TEXT NOT NULL,
    commit_sha    TEXT NOT NULL,
    context       TEXT NOT NULL,
    sending_until REAL NOT NULL,
    owner_pid     INTEGER NOT NULL,
    PRIMARY KEY (forge, repo_json, commit_sha, context)
);
CREATE TABLE IF NOT EXISTS repositories (
    forge           TEXT NOT NULL,
    repo            TEXT NOT NULL,
    repo_json       TEXT NOT NULL,
    last_webhook_at REAL,
    last_pass_at    REAL,
    PRIMARY KEY (forge, repo)
);
CREATE TABLE IF NOT EXISTS heads (
    forge      TEXT NOT NULL,
    repo       TEXT NOT NULL,
    ref_key    TEXT NOT NULL,
    commit_sha TEXT NOT NULL,
    seen_at    REAL NOT NULL,
    PRIMARY KEY (forge, repo, ref_key)
);
"""

# queued < running < final: a status only ever moves to a higher rank.
_RANK = {StatusState.PENDING: 0, StatusState.RUNNING: 1}
# How soon a sender looks again at a due context another sender holds: that sender may
# be another process, whose release wakes nobody here.
CLAIM_POLL_S = 0.5


def _rank(state: StatusState) -> int:
    return _RANK.get(state, 2)


def repo_json(repo: Repo) -> str:
    return json.dumps(
        {"owner": repo.owner, "name": repo.name, "clone_url": repo.clone_url, "project_id": repo.project_id}
    )


def repo_from_json(text: str) -> Repo:
    return Repo(**json.loads(text))


@dataclass(frozen=True)
class Delivery:
    key: str
    forge: str
    repo: str
    source: str  # webhook | catch-up | rerun
    event: dict[str, Any]


@dataclass(frozen=True)
class Run:
    request_id: str
    forge: str
    repo: Repo
    commit_sha: str
    ref_key: str
    job_name: str
    context: str
    request: str  # the JobRequest as published (JSON)
    published: bool


@dataclass(frozen=True)
class PendingStatus:
    row: int
    forge: str
    repo: Repo
    commit_sha: str
    status: CommitStatus
    attempts: int


def _run(row: tuple[Any, ...]) -> Run:
    return Run(row[0], row[1], repo_from_json(row[2]), row[3], row[4], row[5], row[6], row[7], row[8] is not None)


_RUN_COLUMNS = "request_id, forge, repo_json, commit_sha, ref_key, job_name, context, request, published_at"


def _insert_run(conn: sqlite3.Connection, run: Run) -> bool:
    cursor = conn.execute(
        "INSERT OR IGNORE INTO runs (request_id, forge, repo, repo_json, commit_sha, ref_key, job_name, context,"
        " request, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            run.request_id,
            run.forge,
            run.repo.full_name,
            repo_json(run.repo),
            run.commit_sha,
            run.ref_key,
            run.job_name,
            run.context,
            run.request,
            time.time(),
        ),
    )
    return cursor.rowcount == 1


def _propose(
    conn: sqlite3.Connection, forge: str, repo: Repo, commit_sha: str, status: CommitStatus, *, restart: bool
) -> bool:
    row = conn.execute(
        "SELECT state FROM statuses WHERE forge = ? AND repo = ? AND commit_sha = ? AND context = ?",
        (forge, repo.full_name, commit_sha, status.context),
    ).fetchone()
    if row is not None and not restart:
        current = StatusState(row[0])
        if _rank(status.state) < _rank(current) or (current.final and status.state.final) or status.state is current:
            return False
    conn.execute(
        "INSERT OR REPLACE INTO statuses (forge, repo, commit_sha, context, repo_json, state, description,"
        " target_url, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            forge,
            repo.full_name,
            commit_sha,
            status.context,
            repo_json(repo),
            status.state.value,
            status.description,
            status.target_url,
            time.time(),
        ),
    )
    conn.execute(
        "INSERT INTO status_outbox (forge, repo_json, commit_sha, context, state, description, target_url)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (forge, repo_json(repo), commit_sha, status.context, status.state.value, status.description, status.target_url),
    )
    return True


def _claim_key(pending: PendingStatus) -> tuple[str, str, str, str]:
    # The outbox's unit of order (statuses_to_send groups by the same columns).
    return pending.forge, repo_json(pending.repo), pending.commit_sha, pending.status.context


def _alive(pid: int) -> bool:
    """Whether process `pid` exists. Every sender is on this host: the journal is SQLite
    in WAL mode, which does not work across hosts."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def _release(conn: sqlite3.Connection, pending: PendingStatus) -> None:
    conn.execute(
        "DELETE FROM status_claims WHERE forge = ? AND repo_json = ? AND commit_sha = ? AND context = ?",
        _claim_key(pending),
    )


class BridgeJournal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = GroupCommitDatabase(path, schema=_SCHEMA, thread_name=f"forge-journal:{path}")

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)

    # --- deliveries ---------------------------------------------------------------------
    async def record_delivery(self, key: str, *, forge: str, repo: str, source: str, event: dict[str, Any]) -> bool:
        """Keep a delivery to process; False when this key was recorded before."""

        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            if source == "webhook":  # the repository is known from its own webhooks
                conn.execute(
                    "INSERT INTO repositories (forge, repo, repo_json, last_webhook_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (forge, repo) DO UPDATE SET repo_json = excluded.repo_json, last_webhook_at = excluded.last_webhook_at",
                    (forge, repo, json.dumps(event["repo"]), now),
                )
            cursor = conn.execute(
                "INSERT OR IGNORE INTO deliveries (key, forge, repo, source, event, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key, forge, repo, source, json.dumps(event), now),
            )
            return cursor.rowcount == 1

        return await self._db.submit(op)

    async def open_deliveries(self) -> list[Delivery]:
        def op(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(
                "SELECT key, forge, repo, source, event FROM deliveries WHERE done_at IS NULL ORDER BY received_at"
            ).fetchall()
            return [Delivery(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]

        return await self._db.submit(op)

    async def finish_delivery(self, key: str, outcome: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE deliveries SET done_at = ?, outcome = ? WHERE key = ?", (time.time(), outcome, key))

        await self._db.submit(op)

    # --- runs -------------------------------------------------------------------------------
    async def run(self, request_id: str) -> Run | None:
        def op(conn: sqlite3.Connection) -> Run | None:
            row = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE request_id = ?", (request_id,)).fetchone()
            return _run(row) if row else None

        return await self._db.submit(op)

    async def runs_for_commit(self, repo: str, commit_sha: str) -> list[Run]:
        def op(conn: sqlite3.Connection) -> list[Run]:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE repo = ? AND commit_sha = ? ORDER BY created_at",
                (repo, commit_sha),
            ).fetchall()
            return [_run(r) for r in rows]

        return await self._db.submit(op)

    async def runs_for_ref(self, forge: str, repo: str, ref_key: str) -> list[Run]:
        def op(conn: sqlite3.Connection) -> list[Run]:
            rows = conn.execute(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE forge = ? AND repo = ? AND ref_key = ? ORDER BY created_at",
                (forge, repo, ref_key),
            ).fetchall()
            return [_run(r) for r in rows]

        return await self._db.submit(op)

    async def propose_status(
        self, forge: str, repo: Repo, commit_sha: str, status: CommitStatus, *, restart: bool = False
    ) -> bool:
        """Make `status` the one to show for its context, unless the context already has
        a status of a higher rank (a late `pending` never overwrites a result; the first
        final state stays). `restart` (an explicit re-run) starts the context over.
        True when the forge must be told."""
        return await self._db.submit(lambda conn: _propose(conn, forge, repo, commit_sha, status, restart=restart))

    async def add_plan(
        self, runs: list[Run], statuses: list[tuple[str, Repo, str, CommitStatus]]
    ) -> tuple[list[Run], bool]:
        """In one transaction: keep the runs (existing ones stay as they are) and propose
        the statuses. Returns the runs as journaled now, and whether a status changed."""

        def op(conn: sqlite3.Connection) -> tuple[list[Run], bool]:
            for run in runs:
                _insert_run(conn, run)
            changed = [_propose(conn, *status, restart=False) for status in statuses]
            current = [
                _run(row)
                for run in runs
                if (
                    row := conn.execute(
                        f"SELECT {_RUN_COLUMNS} FROM runs WHERE request_id = ?", (run.request_id,)
                    ).fetchone()
                )
            ]
            return current, any(changed)

        return await self._db.submit(op)

    async def complete_delivery(
        self, key: str | None, *, published: list[str], head: tuple[str, str, str, str] | None, outcome: str | None
    ) -> None:
        """In one transaction: the runs published, the ref's head seen, and the delivery
        `key` done (`outcome`) — or left open for another try (`outcome` None). A re-run
        has no delivery (`key` None)."""

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.executemany(
                "UPDATE runs SET published_at = ? WHERE request_id = ? AND published_at IS NULL",
                [(now, i) for i in published],
            )
            if head is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO heads (forge, repo, ref_key, commit_sha, seen_at) VALUES (?, ?, ?, ?, ?)",
                    (*head, now),
                )
            if outcome is not None and key is not None:
                conn.execute("UPDATE deliveries SET done_at = ?, outcome = ? WHERE key = ?", (now, outcome, key))

        await self._db.submit(op)

    async def statuses_to_send(self, now: float) -> list[PendingStatus]:
        """The oldest unsent step of each context, when it is due (a context's later
        steps wait for its earlier ones)."""

        def op(conn: sqlite3.Connection) -> list[PendingStatus]:
            rows = conn.execute(
                "SELECT id, forge, repo_json, commit_sha, context, state, description, target_url, attempts"
                " FROM status_outbox WHERE id IN (SELECT MIN(id) FROM status_outbox GROUP BY forge, repo_json, commit_sha, context)"
                " AND next_try_at <= ? ORDER BY id",
                (now,),
            ).fetchall()
            return [
                PendingStatus(
                    r[0], r[1], repo_from_json(r[2]), r[3], CommitStatus(StatusState(r[5]), r[4], r[6], r[7]), r[8]
                )
                for r in rows
            ]

        return await self._db.submit(op)

    async def claim_status(self, pending: PendingStatus, *, now: float, lease_s: float) -> PendingStatus | None:
        """Claim `pending`'s context for one send, until `status_done`, `status_retry` or
        `status_release`, or until `lease_s` passes or the claiming process is gone (a
        sender that died: a bridge SIGKILLed mid-send sends again as soon as it is
        restarted, not a lease later). Returns the context's oldest unsent step as it
        is now — another sender may have sent the listed one meanwhile — or None when
        no step is due or another sender (maybe another process) holds the context."""
        key = _claim_key(pending)

        def op(conn: sqlite3.Connection) -> PendingStatus | None:
            held = conn.execute(
                "SELECT owner_pid FROM status_claims WHERE forge = ? AND repo_json = ? AND commit_sha = ? AND context = ?"
                " AND sending_until > ?",
                (*key, now),
            ).fetchone()
            if held is not None and _alive(held[0]):  # this process's own claims count too
                return None
            row = conn.execute(
                "SELECT id, state, description, target_url, attempts, next_try_at FROM status_outbox"
                " WHERE forge = ? AND repo_json = ? AND commit_sha = ? AND context = ? ORDER BY id LIMIT 1",
                key,
            ).fetchone()
            if row is None or row[5] > now:
                return None
            conn.execute(
                "INSERT OR REPLACE INTO status_claims (forge, repo_json, commit_sha, context, sending_until,"
                " owner_pid) VALUES (?, ?, ?, ?, ?, ?)",
                (*key, now + lease_s, os.getpid()),
            )
            status = CommitStatus(StatusState(row[1]), pending.status.context, row[2], row[3])
            return PendingStatus(row[0], pending.forge, pending.repo, pending.commit_sha, status, row[4])

        return await self._db.submit(op)

    async def status_release(self, pending: PendingStatus) -> None:
        """Give a claim up without sending (the sender stops)."""
        await self._db.submit(lambda conn: _release(conn, pending))

    async def next_status_try(self) -> float | None:
        """When the next step may be due. Only each context's oldest step counts (the
        later ones wait for it, whatever their own time); one another sender holds is
        due at the end of that sender's lease, but looked at again after a short poll."""

        def op(conn: sqlite3.Connection) -> float | None:
            return conn.execute(
                "SELECT MIN(MAX(o.next_try_at, MIN(COALESCE(c.sending_until, 0), ?))) FROM status_outbox o"
                " LEFT JOIN status_claims c USING (forge, repo_json, commit_sha, context)"
                " WHERE o.id IN (SELECT MIN(id) FROM status_outbox GROUP BY forge, repo_json, commit_sha, context)",
                (time.time() + CLAIM_POLL_S,),
            ).fetchone()[0]

        return await self._db.submit(op)

    async def status_done(self, pending: PendingStatus, *, error: str | None = None) -> None:
        """Sent, or given up on (`error`, logged by the caller): not tried again."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM status_outbox WHERE id = ?", (pending.row,))
            _release(conn, pending)

        await self._db.submit(op)

    async def status_retry(self, pending: PendingStatus, *, at: float, error: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE status_outbox SET attempts = attempts + 1, next_try_at = ?, error = ? WHERE id = ?",
                (at, error, pending.row),
            )
            _release(conn, pending)

        await self._db.submit(op)

    async def last_status(self, forge: str, repo: str, commit_sha: str, context: str) -> StatusState | None:
        def op(conn: sqlite3.Connection) -> StatusState | None:
            row = conn.execute(
                "SELECT state FROM statuses WHERE forge = ? AND repo = ? AND commit_sha = ? AND context = ?",
                (forge, repo, commit_sha, context),
            ).fetchone()
            return StatusState(row[0]) if row else None

        return await self._db.submit(op)

    # --- repositories and heads (catch-up) ---------------------------------------------------
    async def repositories_seen(self, forge: str) -> list[str]:
        """Repositories a webhook has come from."""

        def op(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT repo FROM repositories WHERE forge = ? AND last_webhook_at IS NOT NULL", (forge,)
            )
            return [row[0] for row in rows]

        return await self._db.submit(op)

    async def repository(self, forge: str, repo: str) -> Repo | None:
        def op(conn: sqlite3.Connection) -> Repo | None:
            row = conn.execute(
                "SELECT repo_json FROM repositories WHERE forge = ? AND repo = ?", (forge, repo)
            ).fetchone()
            return repo_from_json(row[0]) if row else None

        return await self._db.submit(op)

    async def repository_health(self) -> list[tuple[str, str, float | None, float | None]]:
        """(forge, repo, last webhook, last pass) for every repository the bridge knows."""

        def op(conn: sqlite3.Connection) -> list[tuple[str, str, float | None, float | None]]:
            return conn.execute(
                "SELECT forge, repo, last_webhook_at, last_pass_at FROM repositories ORDER BY forge, repo"
            ).fetchall()

        return await self._db.submit(op)

    async def repository_has_runs(self, forge: str, repo: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute("SELECT 1 FROM runs WHERE forge = ? AND repo = ? LIMIT 1", (forge, repo)).fetchone()
                is not None
            )

        return await self._db.submit(op)

    async def has_run(self, forge: str, repo: str, ref_key: str, commit_sha: str) -> bool:
        """Whether this commit was planned for this ref already (by any delivery)."""

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT EXISTS (SELECT 1 FROM runs WHERE forge = ? AND repo = ? AND ref_key = ? AND commit_sha = ?)"
                " OR EXISTS (SELECT 1 FROM deliveries WHERE key = ?)",
                (forge, repo, ref_key, commit_sha, f"{forge}/catch-up/{ref_key}/{commit_sha}"),
            ).fetchone()
            return bool(row[0])

        return await self._db.submit(op)

    async def record_heads(self, forge: str, name: str, repo: Repo, heads: dict[str, str]) -> None:
        """The heads a catch-up pass saw for repository `name` (as configured), and when
        it saw them. `repo` is the repository as the pass used it: kept unless a webhook
        described it already, so the next pass need not ask the forge's API again."""

        def op(conn: sqlite3.Connection) -> None:
            now = time.time()
            conn.executemany(
                "INSERT OR REPLACE INTO heads (forge, repo, ref_key, commit_sha, seen_at) VALUES (?, ?, ?, ?, ?)",
                [(forge, name, ref_key, sha, now) for ref_key, sha in heads.items()],
            )
            row = conn.execute(
                "SELECT repo_json FROM repositories WHERE forge = ? AND repo = ?", (forge, name)
            ).fetchone()
            # A webhook's description wins; a row without a clone URL (written by passes
            # before they kept theirs) is replaced.
            described = row[0] if row is not None and repo_from_json(row[0]).clone_url else repo_json(repo)
            conn.execute(
                "INSERT INTO repositories (forge, repo, repo_json, last_pass_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (forge, repo) DO UPDATE SET repo_json = excluded.repo_json, last_pass_at = excluded.last_pass_at",
                (forge, name, described, now),
            )

        await self._db.submit(op)

    async def record_head(self, forge: str, repo: str, ref_key: str, commit_sha: str) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO heads (forge, repo, ref_key, commit_sha, seen_at) VALUES (?, ?, ?, ?, ?)",
                (forge, repo, ref_key, commit_sha, time.time()),
            )

        await self._db.submit(op)

    async def heads(self, forge: str, repo: str) -> dict[str, str]:
        def op(conn: sqlite3.Connection) -> dict[str, str]:
            rows = conn.execute(
                "SELECT ref_key, commit_sha FROM heads WHERE forge = ? AND repo = ?", (forge, repo)
            ).fetchall()
            return dict(rows)

        return await self._db.submit(op)
