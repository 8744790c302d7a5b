"""The journal: every state change — entering the journal included — goes through one
transition table, checked in the database's own transaction (a real SQLite file)."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from orchestrator.core.messages import JobRequest, JobResult, JobStatus
from orchestrator.host.journal import InvalidTransition, JobState, Journal


def request(attempt: int = 1, job_id: uuid.UUID | None = None) -> JobRequest:
    return JobRequest(request_id=job_id or uuid.uuid4(), repo_url="https://x/y", commit_sha="a" * 40, attempt=attempt)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    journal = Journal(tmp_path / "state.db")
    yield journal
    await journal.close()


async def accept(journal: Journal, req: JobRequest) -> bool:
    return await journal.accept(
        req, label="alpha", nonce="n", vm_name=f"job-{req.job_id}", backend="noop", accepted_at=1.0
    )


async def test_accept_records_a_job_once_and_a_redelivery_is_refused(journal: Journal):
    req = request()
    assert await accept(journal, req)
    assert not await accept(journal, req)
    record = await journal.get(req.job_id)
    assert record is not None and record.state is JobState.ACCEPTED and record.accepted_at == 1.0


@pytest.mark.parametrize("handed_on", [JobState.REQUEUED, JobState.SUPERSEDED])
async def test_a_job_handed_on_comes_back_only_as_a_later_attempt(journal: Journal, handed_on: JobState):
    req = request()
    await accept(journal, req)
    await journal.move(req.job_id, handed_on)
    assert not await accept(journal, req)  # the same attempt again: a redelivery
    answer = JobResult.for_request(req, status=JobStatus.CANCELLED, summary="cancelled")
    assert not await journal.record_answer(req, answer, label="alpha")
    assert await accept(journal, request(attempt=2, job_id=req.request_id))
    assert (await journal.get(req.job_id)).attempt == 2


async def test_answers_enter_as_finished_and_never_overwrite_a_known_job(journal: Journal):
    req = request()
    answer = JobResult.for_request(req, status=JobStatus.ERROR, summary="stale")
    assert await journal.record_answer(req, answer, label="alpha")
    assert not await journal.record_answer(req, answer, label="alpha")
    assert not await accept(journal, req)
    assert (await journal.get(req.job_id)).state is JobState.FINISHED


async def test_moves_outside_the_table_are_refused(journal: Journal):
    req = request()
    with pytest.raises(InvalidTransition, match="not in the journal"):
        await journal.move(req.job_id, JobState.RUNNING)
    await accept(journal, req)
    with pytest.raises(InvalidTransition, match="accepted -> published is not allowed"):
        await journal.move(req.job_id, JobState.PUBLISHED)
    with pytest.raises(ValueError, match="cannot set"):
        await journal.move(req.job_id, JobState.RUNNING, state="finished")
    # Nothing of the refused moves reached the file.
    with sqlite3.connect(journal.path) as db:
        assert db.execute("SELECT state FROM jobs").fetchall() == [("accepted",)]


async def test_a_later_attempt_of_a_requeued_job_may_be_answered(journal: Journal):
    req = request()
    await accept(journal, req)
    await journal.move(req.job_id, JobState.REQUEUED)
    same = JobResult.for_request(req, status=JobStatus.CANCELLED, summary="cancelled")
    assert not await journal.record_answer(req, same, label="alpha")
    later = request(attempt=2, job_id=req.request_id)
    stale = JobResult.for_request(later, status=JobStatus.ERROR, summary="stale")
    assert await journal.record_answer(later, stale, label="alpha")
    assert (await journal.get(req.job_id)).state is JobState.FINISHED


async def test_a_database_locked_too_long_fails_that_write_and_the_journal_keeps_serving(tmp_path: Path):
    from orchestrator.core.sqlitedb import GroupCommitDatabase

    path = tmp_path / "shared.db"
    db = GroupCommitDatabase(
        path, schema="CREATE TABLE IF NOT EXISTS t (v INTEGER);", thread_name="t", busy_timeout_s=0.2
    )
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await asyncio.wait_for(db.submit(lambda conn: conn.execute("INSERT INTO t VALUES (1)")), 10)
        other.execute("COMMIT")
        await asyncio.wait_for(db.submit(lambda conn: conn.execute("INSERT INTO t VALUES (2)")), 10)  # still alive
        assert await db.submit(lambda conn: conn.execute("SELECT v FROM t").fetchall()) == [(2,)]
    finally:
        other.close()
        await asyncio.to_thread(db.close)
