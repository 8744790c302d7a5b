"""The daemon's background tasks end at shutdown even when one swallows a cancellation
(aiormq does, now and then, when the cancel lands while it closes a channel: the
housekeeping loop then went on and the daemon never stopped)."""

from __future__ import annotations

import asyncio

from orchestrator.core.lifecycle import BackgroundTasks


async def test_a_task_that_swallows_its_cancellation_is_cancelled_again_until_it_ends():
    swallowed = asyncio.Event()
    ended = asyncio.Event()

    async def stubborn() -> None:
        try:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed.set()  # what a library's `except` can do to a cancel
            await asyncio.sleep(3600)
        finally:
            ended.set()

    tasks = BackgroundTasks()
    tasks.spawn(stubborn(), name="stubborn")
    tasks.spawn(asyncio.sleep(3600), name="plain")
    await asyncio.sleep(0)  # both running
    await asyncio.wait_for(tasks.cancel_all(), 10)
    assert swallowed.is_set() and ended.is_set()
