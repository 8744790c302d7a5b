"""Follows a VM's console log file while the job runs.

The console file is the job's log (kept under STATE_DIR/logs/). The follower reads what
is new every `interval_s` (off the event loop), keeps the tail for the result line and
for error reports, sets `has_output` once the guest printed anything (the boot timeout
watches it), and keeps the file under `max_bytes` (`orchestrator.core.consolecap`). Readers
of the log for people use `orchestrator.web.joblog`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from orchestrator.core.consolecap import cap_console, read_cut_state, settle

TAIL_BYTES = 64 * 1024


def _read_tail(path: Path, offset: int) -> tuple[int, bytes]:
    """The file's size now and its bytes after `offset`, at most the last `TAIL_BYTES`
    of them: the follower keeps only the tail, so a fast printer costs no memory."""
    try:
        with path.open("rb") as console:
            size = os.fstat(console.fileno()).st_size
            start = min(max(offset, size - TAIL_BYTES), size)
            console.seek(start)
            return size, console.read(size - start)
    except FileNotFoundError:
        return offset, b""


def _cap(path: Path, max_bytes: int, offset: int) -> int:
    """Cut the file when it is over `max_bytes`; where `offset` points afterwards. A
    file shorter than `offset` was replaced (libvirt's virtlogd rotates console files
    at 2 MiB when qemu.conf says `stdio_handler = "logd"`): read the new one whole."""
    try:
        before = read_cut_state(path)
        if cap_console(path, max_bytes=max_bytes):
            offset = read_cut_state(path).moved(offset, since=before)
        return offset if path.stat().st_size >= offset else 0
    except FileNotFoundError:
        return offset


class ConsoleFollower:
    """With a `start_marker` (the line a job's script prints first), `started` is set
    and `started_at` taken when it appears; until then the file is read every
    `fast_interval_s`, so the time is that close to when the guest printed it."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        interval_s: float = 0.5,
        start_marker: bytes | None = None,
        fast_interval_s: float = 0.05,
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.interval_s = interval_s
        self.fast_interval_s = fast_interval_s
        self.offset = 0
        self._tail = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._finished = False
        self.has_output = asyncio.Event()
        self._start_marker = start_marker
        self.started = asyncio.Event()
        self.started_at: float | None = None

    def start(self) -> None:
        if self._task is None and not self._finished:
            self._task = asyncio.create_task(self._follow(), name=f"console-{self.path.name}")

    async def skip_existing(self) -> None:
        """Start after what the file holds now (an earlier attempt's output on this host):
        only this run's output counts as booting, and for the result."""
        try:
            self.offset = (await asyncio.to_thread(self.path.stat)).st_size
        except FileNotFoundError:
            self.offset = 0

    async def poll(self) -> int:
        """Read what is new (cutting the file first when it is over `max_bytes`);
        returns how many bytes that was."""
        self.offset = await asyncio.to_thread(_cap, self.path, self.max_bytes, self.offset)
        return self._take(*await asyncio.to_thread(_read_tail, self.path, self.offset))

    def _take(self, size: int, chunk: bytes) -> int:
        grown = size - self.offset
        if grown > 0:
            self.has_output.set()
            self.offset = size
            self._tail += chunk
            marker = self._start_marker
            if marker is not None and not self.started.is_set() and marker in self._tail[-(len(chunk) + len(marker)) :]:
                self.started_at = time.time()
                self.started.set()
            del self._tail[:-TAIL_BYTES]
        return max(0, grown)

    async def _follow(self) -> None:
        while True:
            waiting_for_start = self._start_marker is not None and not self.started.is_set()
            await asyncio.sleep(self.fast_interval_s if waiting_for_start else self.interval_s)
            await self.poll()

    async def finish(self) -> str:
        """Stop following, read the rest, and return the tail as text."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if not self._finished:
            # One read to the end: the VM has stopped writing.
            self._finished = True
            self.offset = await asyncio.to_thread(_cap, self.path, self.max_bytes, self.offset)
            self._take(*await asyncio.to_thread(_read_tail, self.path, self.offset))
            await asyncio.to_thread(settle, self.path)
        return self._tail.decode("utf-8", errors="replace")
