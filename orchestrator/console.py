"""Follows a VM's console log file while the job runs.

The console file is the job's log (kept under STATE_DIR/logs/). The follower reads what
is new every `interval_s` (off the event loop), keeps the tail for the result line and
for error reports, and records when the guest first printed anything.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

TAIL_BYTES = 64 * 1024


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as console:
            console.seek(offset)
            return console.read()
    except FileNotFoundError:
        return b""


class ConsoleFollower:
    def __init__(self, path: Path, *, interval_s: float = 0.5) -> None:
        self.path = path
        self.interval_s = interval_s
        self.offset = 0
        self.first_output_at: float | None = None
        self._tail = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        self.has_output = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name=f"console-{self.path.name}")

    async def poll(self) -> int:
        """Read what is new; returns how many bytes that was."""
        return self._take(await asyncio.to_thread(_read_from, self.path, self.offset))

    def _take(self, chunk: bytes) -> int:
        if chunk:
            if self.first_output_at is None:
                self.first_output_at = time.monotonic()
                self.has_output.set()
            self.offset += len(chunk)
            self._tail += chunk
            del self._tail[:-TAIL_BYTES]
        return len(chunk)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.poll()

    def text_since(self, offset: int) -> str:
        """What was read after `offset` (as far as the kept tail reaches)."""
        new = self.offset - offset
        return bytes(self._tail[-new:]).decode("utf-8", errors="replace") if new > 0 else ""

    async def finish(self) -> str:
        """Stop following, read the rest, and return the tail as text."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._finished:
            # One read to the end: the VM has stopped writing.
            self._finished = True
            self._take(await asyncio.to_thread(_read_from, self.path, self.offset))
        return self._tail.decode("utf-8", errors="replace")
