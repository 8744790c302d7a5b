"""Starting and stopping a service (the host daemon, the forge bridge): a start-up failure
as one line naming the fix, shutdown steps that cannot hang, background tasks that end
when asked and say when they fail."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import aio_pika

from hypervisors.base import BackendError
from orchestrator.core.amqp import describe_error
from orchestrator.core.logsetup import EventLogger

log = EventLogger("orchestrator.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message is one line: what failed and how to fix it."""


@contextlib.contextmanager
def failing_as(what: str, fix: str | None = None) -> Iterator[None]:
    """Turn the errors a start-up step can meet into one `StartupError` line."""
    try:
        yield
    except StartupError:
        raise
    except (TimeoutError, OSError, sqlite3.Error, BackendError, aio_pika.exceptions.AMQPError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe_error(exc)
        raise StartupError(f"{what}: {detail}" + (f" ({fix})" if fix else "")) from None


CLOSE_STEP_TIMEOUT_S = 15.0
CANCEL_AGAIN_S = 1.0


def bounded(close: Callable[[], Awaitable[object]], what: str) -> Callable[[], Awaitable[None]]:
    """A shutdown step that cannot hang the daemon's exit (a broker gone mid-close)."""

    async def step() -> None:
        try:
            await asyncio.wait_for(close(), CLOSE_STEP_TIMEOUT_S)
        except TimeoutError:
            log.warning("daemon.close_timed_out", step=what, timeout_s=CLOSE_STEP_TIMEOUT_S)

    return step


class BackgroundTasks:
    """Tasks the daemon starts and forgets until shutdown, which cancels them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def spawn(self, work: Coroutine[Any, Any, object], *, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        """A task that failed says so once, in one line (never "exception was never retrieved")."""
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task.failed", task=task.get_name(), error=describe_error(task.exception()))

    async def cancel_all(self) -> None:
        """Cancel every task and wait until each has ended. One still running a second
        later is cancelled again: aiormq can swallow a cancellation that lands while it
        closes a channel, and the task then went on (the housekeeping loop once kept a
        daemon from stopping at all)."""
        pending, self._tasks = set(self._tasks), set()
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
