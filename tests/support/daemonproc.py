"""A daemon as a separate process, for tests that kill it."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[2]


class DaemonProcess:
    """Every instance is recorded in `started` so a fixture can kill what a failed test left."""

    started: ClassVar[list[DaemonProcess]] = []

    def __init__(
        self,
        env: dict[str, str],
        *,
        limits: Mapping[int, int] | None = None,
        preexec_fn: Callable[[], None] | None = None,
    ) -> None:
        """`limits`: resource (e.g. `resource.RLIMIT_AS`) -> soft and hard limit in the
        daemon, so a test of hostile input fails instead of exhausting the machine;
        `preexec_fn` runs in the child after them (e.g. for a soft limit below the hard)."""
        DaemonProcess.started.append(self)
        self.env = {**os.environ, "LOG_FORMAT": "json", **env}
        self.limits = dict(limits or {})
        self.preexec_fn = preexec_fn
        self.process: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()

    async def start(self, timeout_s: float = 60) -> DaemonProcess:
        self._started.clear()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "orchestrator",
            "run",
            env=self.env,
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
            preexec_fn=self._in_child if self.limits or self.preexec_fn else None,
        )
        self._reader = asyncio.create_task(self._read(self.process))
        started = asyncio.create_task(self._started.wait())
        exited = asyncio.create_task(self.process.wait())
        await asyncio.wait({started, exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        exited.cancel()
        if not self._started.is_set():
            if self.process.returncode is not None:
                await self._reader  # its last lines, up to the end of its stderr
            tail = "".join(self.lines[-20:])
            raise AssertionError(
                f"the daemon did not log daemon.started within {timeout_s:g} s; its last lines:\n{tail}"
            )
        return self

    def _in_child(self) -> None:
        """Runs in the child, between fork and exec."""
        for which, limit in self.limits.items():
            resource.setrlimit(which, (limit, limit))
        if self.preexec_fn is not None:
            self.preexec_fn()

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            text = line.decode(errors="replace")
            self.lines.append(text)
            if '"daemon.started"' in text:
                self._started.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        """The logged events called `name`, parsed (lines that are not JSON are skipped)."""
        found = []
        for line in self.lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    async def kill(self) -> None:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()
        if self._reader is not None:
            await self._reader

    async def stop(self, timeout_s: float = 60) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            self.process.send_signal(signal.SIGUSR1)  # its threads' stacks, to stderr
            await asyncio.sleep(1)
            tail = "".join(self.lines[-80:])
            raise AssertionError(
                f"the daemon did not stop within {timeout_s:g} s of SIGTERM; its last lines:\n{tail}"
            ) from None
        if self._reader is not None:
            await self._reader
        return code
