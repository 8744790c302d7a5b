"""SQLite for durable state on the event loop's terms: one thread owns the connection
(WAL, `synchronous=FULL`) and runs queued operations in shared transactions, so fsync
is paid once per group of writes and the loop never blocks on SQLite. Each operation
runs in its own savepoint: one that fails is undone without undoing the others.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class GroupCommitDatabase:
    """One thread owning the connection; runs queued operations in shared transactions."""

    def __init__(self, path: Path, *, schema: str, thread_name: str, busy_timeout_s: float = 30.0) -> None:
        # Another process may write the same file (`orchestrator forge catch-up` beside the
        # service): wait for its transaction rather than fail at once.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(schema)
        self._pending: list[
            tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
        ] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
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
            outcomes = self._commit(batch)
            for (ok, value), (_, future, loop) in zip(outcomes, batch, strict=True):
                loop.call_soon_threadsafe(functools.partial(_settle, future, value, ok=ok))
        self._conn.close()

    def _commit(
        self, batch: list[tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]]
    ) -> list[tuple[bool, Any]]:
        """Run a batch in one transaction. Whatever fails — the database locked longer
        than the busy timeout, a full disk — fails this batch's operations and leaves the
        thread serving the next one: a stuck journal would hang everything that waits
        on it."""
        outcomes: list[tuple[bool, Any]] = []
        try:
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
            self._conn.execute("COMMIT")
            return outcomes
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return [(False, exc)] * len(batch)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()


def _settle(future: asyncio.Future[Any], value: Any, *, ok: bool) -> None:
    if future.done():
        return
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
