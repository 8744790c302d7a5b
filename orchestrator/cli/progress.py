"""Download progress of `images prepare` on stderr."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from orchestrator.core.images import ImageStatus


class ProgressPrinter:
    """A progress bar on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO | None = None, *, interval_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval_s = 0.2 if self.tty else interval_s
        self._last = 0.0

    def __call__(self, status: ImageStatus) -> None:
        now = time.monotonic()
        if now - self._last < self.interval_s:
            return
        self._last = now
        elapsed = max(1e-6, now - (status.started_at or now))
        rate = status.bytes_in / elapsed
        total = status.bytes_total
        mib = 2**20
        if total:
            eta = (total - status.bytes_in) / rate if rate else 0
            text = f"{status.label}: {status.bytes_in / mib:.0f}/{total / mib:.0f} MiB {100 * status.bytes_in / total:3.0f}% {rate / mib:.1f} MiB/s ETA {eta:.0f}s"
        else:
            text = f"{status.label}: {status.bytes_in / mib:.0f} MiB {rate / mib:.1f} MiB/s"
        if self.tty:
            width = 24
            done = int(width * (status.bytes_in / total)) if total else 0
            print(f"\r[{'#' * done}{'.' * (width - done)}] {text}", end="", file=self.stream, flush=True)
        else:
            print(text, file=self.stream, flush=True)

    def done(self) -> None:
        if self.tty:
            print(file=self.stream)
