"""A job's console log as text for people: `\\n` line ends, read by byte offset.

The console file is what the guest's serial port wrote (CRLF line ends, progress bars
with bare CR, anything a job prints); it is kept exactly as written. Readers get it
normalised — CRLF and a bare CR each become one LF — without ever holding more than one
chunk in memory, so a log of any size is served at constant cost:

- `LogText` maps between offsets in the raw file and in the normalised text (what an
  HTTP `Range` names) and yields the text of a range chunk by chunk;
- `LineFollower` follows a file that is still growing and returns complete lines (for
  server-sent events: one event per console line, and a line can never contain a
  character that would end or forge an event).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.consolecap import read_cut_state

CHUNK_BYTES = 1024 * 1024
MAX_LINE_BYTES = 16 * 1024  # a longer console line is sent in pieces of about this size
MAX_LINE_CHARS = MAX_LINE_BYTES


def normalize(chunk: bytes, *, after_cr: bool) -> tuple[bytes, bool]:
    """`chunk` with CRLF and bare CR as LF; `after_cr` says the previous chunk ended in
    CR (so a leading LF here belongs to that CR). Returns the text and the new state."""
    if after_cr and chunk.startswith(b"\n"):
        chunk = chunk[1:]
    if not chunk:
        return b"", False
    return chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n"), chunk.endswith(b"\r")


def _read(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as console:
        console.seek(offset)
        return console.read(size)


@dataclass(frozen=True)
class TextExtent:
    raw_size: int  # bytes of the console file when it was measured
    text_size: int  # bytes of its normalised text


class LogText:
    """The normalised text of one console file. Blocking: call from a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _chunks(self, start: int, end: int) -> Iterator[tuple[int, bytes]]:
        with self.path.open("rb") as console:
            console.seek(start)
            offset = start
            while offset < end:
                chunk = console.read(min(CHUNK_BYTES, end - offset))
                if not chunk:
                    return
                yield offset, chunk
                offset += len(chunk)

    def measure(self) -> TextExtent:
        """The file's size now and the size of its text (each CRLF is one byte shorter)."""
        raw_size = self.path.stat().st_size
        pairs = 0
        last = b""
        for _, chunk in self._chunks(0, raw_size):
            pairs += chunk.count(b"\r\n") + (last == b"\r" and chunk.startswith(b"\n"))
            last = chunk[-1:]
        return TextExtent(raw_size, raw_size - pairs)

    def raw_offset(self, text_offset: int, raw_size: int) -> int:
        """The offset in the file where the text from `text_offset` on begins."""
        text_seen = 0
        after_cr = False
        for offset, chunk in self._chunks(0, raw_size):
            skip = 1 if after_cr and chunk.startswith(b"\n") else 0
            body = chunk[skip:]
            text_here = len(body) - body.count(b"\r\n")
            if text_seen + text_here > text_offset:
                # Walk the CRLF pairs of this chunk: each one before the target shifts
                # the raw position by one.
                wanted = text_offset - text_seen
                removed = 0
                at = body.find(b"\r\n")
                while at != -1 and wanted + removed > at:
                    removed += 1
                    at = body.find(b"\r\n", at + 2)
                return offset + skip + wanted + removed
            text_seen += text_here
            after_cr = chunk.endswith(b"\r")
        return raw_size

    def text(self, start_raw: int, end_raw: int, limit: int | None = None) -> Iterator[bytes]:
        """The normalised text of the file's bytes [start_raw, end_raw), at most `limit`
        bytes of it, chunk by chunk."""
        after_cr = start_raw > 0 and _read(self.path, start_raw - 1, 1) == b"\r"
        left = limit
        for _, chunk in self._chunks(start_raw, end_raw):
            text, after_cr = normalize(chunk, after_cr=after_cr)
            if left is not None:
                text = text[:left]
                left -= len(text)
            if text:
                yield text
            if left == 0:
                return


class LineFollower:
    """Complete lines of a growing console file, from a byte offset on.

    `read_lines()` (blocking: call from a worker thread) returns the lines completed
    since the last call; `offset` is then the raw offset just after the last of them, so
    a reader that reconnects (`Last-Event-ID`) resumes exactly there. A partial last
    line stays in the file until its end arrives or `finish()` is called; a line longer
    than `MAX_LINE_BYTES` is returned in pieces. Invalid UTF-8 becomes U+FFFD."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._after_cr = offset > 0 and self._byte_at(offset - 1) == b"\r"
        self._cuts = read_cut_state(path)

    def _byte_at(self, offset: int) -> bytes:
        try:
            return _read(self.path, offset, 1)
        except OSError:
            return b""

    def read_lines(self, max_bytes: int = CHUNK_BYTES, *, final: bool = False) -> list[str]:
        return [line for line, _ in self.read_marked_lines(max_bytes, final=final)]

    def read_marked_lines(self, max_bytes: int = CHUNK_BYTES, *, final: bool = False) -> list[tuple[str, int]]:
        """The lines completed since the last call, each with the raw offset just after
        it (a reader that got this line resumes there: SSE ids)."""
        cuts = read_cut_state(self.path)
        if cuts.cutting:
            return []  # the middle of the file is being cut: read after it
        if cuts != self._cuts:
            self.offset, self._cuts = cuts.moved(self.offset, since=self._cuts), cuts
        try:
            chunk = _read(self.path, self.offset, max_bytes)
        except FileNotFoundError:
            return []
        if read_cut_state(self.path) != cuts:
            return []  # cut while we read: these bytes may have moved
        start = self.offset
        end = _last_line_end(chunk, final=final)
        if end < 0:
            if final and chunk:
                end = len(chunk)  # the job is over: its last line has no line end
            elif len(chunk) >= MAX_LINE_BYTES:
                end = _char_boundary(chunk, MAX_LINE_BYTES)  # a piece of a very long line
                self.offset += end
                return [(chunk[:end].decode("utf-8", errors="replace"), self.offset)]
            else:
                return []
        complete = chunk[:end]
        self.offset += len(complete)
        lines = _marked(complete, start, after_cr=self._after_cr)
        self._after_cr = complete.endswith(b"\r")
        return lines

    def finish(self) -> list[str]:
        """Everything left, once the file will not grow any more (the job has ended)."""
        lines: list[str] = []
        while True:
            before = self.offset
            lines.extend(self.read_lines(final=True))
            if self.offset == before:
                return lines


_LINE_END = re.compile(rb"\r\n|\r|\n")


def _marked(complete: bytes, start: int, *, after_cr: bool) -> list[tuple[str, int]]:
    """The lines of `complete` (which begins at raw offset `start`), each with the raw
    offset after it; a line longer than `MAX_LINE_CHARS` comes in pieces."""
    position = 1 if after_cr and complete.startswith(b"\n") else 0  # the LF of a CRLF already counted
    lines: list[tuple[str, int]] = []

    def add(raw: bytes, line_end: int) -> None:
        text = raw.decode("utf-8", errors="replace")
        pieces = _cut(text)
        offset = start + line_end - len(raw)
        for piece in pieces[:-1]:
            offset += len(piece.encode("utf-8", errors="replace"))
            lines.append((piece, offset))
        lines.append((pieces[-1], start + line_end))

    for match in _LINE_END.finditer(complete, position):
        add(complete[position : match.start()], match.end())
        position = match.end()
    if position < len(complete):  # a last line without its end (the job is over)
        add(complete[position:], len(complete))
    return lines


def _last_line_end(chunk: bytes, *, final: bool) -> int:
    """The offset just after the last line end in `chunk`, or -1. A CR as the very last
    byte may be the first half of a CRLF whose LF has not been written yet: unless the
    file is final, it waits for the next byte."""
    end = max(chunk.rfind(b"\n"), chunk.rfind(b"\r"))
    if end == len(chunk) - 1 and chunk.endswith(b"\r") and not final:
        end = max(chunk.rfind(b"\n", 0, end), chunk.rfind(b"\r", 0, end))
    return end + 1 if end >= 0 else -1


def _char_boundary(chunk: bytes, at: int) -> int:
    """`at`, moved back so that it does not split a UTF-8 sequence."""
    cut = at
    while cut > at - 4 and cut > 0 and chunk[cut] & 0xC0 == 0x80:
        cut -= 1
    return cut if cut > 0 else at


def _cut(line: str) -> list[str]:
    if len(line) <= MAX_LINE_CHARS:
        return [line]
    return [line[i : i + MAX_LINE_CHARS] for i in range(0, len(line), MAX_LINE_CHARS)]
