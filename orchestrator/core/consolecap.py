"""Keeps a console file under `CONSOLE_MAX_BYTES` while its VM is still writing to it.

A guest that prints without end (`yes`) must not fill the disk. Beyond the limit the
file keeps its first MiB (how the job began) and its newest part (how it ends, with the
result line), and one marker line between them says how much was cut:

```
[first MiB][marker block: "[orchestrator: N bytes of console output cut here ...]"][newest part]
```

The writer (QEMU, or our own copier) appends with `O_APPEND`, so the middle can be
removed in place with `fallocate(FALLOC_FL_COLLAPSE_RANGE)` (ext4, XFS): no copy, no
byte the guest writes meanwhile is lost. Where the file system cannot collapse, the file
is rewritten instead (a write that lands during the rewrite can be lost; logged).

Readers that follow the file by offset (SSE, downloads) learn how far the newest part
moved from the sidecar `<console>.cut`, which only the daemon writes (a guest cannot
forge it): `CutState` with the total shift so far, written as `cutting` before a cut and
as stable after it, so a reader never trusts bytes it read while a cut was under way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

HEAD_BYTES = 1024 * 1024
FALLOC_FL_COLLAPSE_RANGE = 0x08

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


@dataclass(frozen=True)
class CutState:
    """What has been cut from one console file so far."""

    shift: int = 0  # bytes the newest part has moved towards the start, in total
    dropped: int = 0  # bytes of guest output gone, in total (what the marker says)
    head: int = HEAD_BYTES  # where the marker block starts
    block: int = 4096  # the marker block's size; the cut region starts after it
    cutting: bool = False  # a cut is under way: bytes read now may be moved ones

    @property
    def cut_start(self) -> int:
        return self.head + self.block

    def moved(self, offset: int, since: CutState) -> int:
        """Where a reader at `offset` (in the file as it was at `since`) reads now: past
        the cut it moves back by the new shift; inside it, to the marker."""
        shift = self.shift - since.shift
        if shift <= 0 or offset <= self.head:
            return offset
        return offset - shift if offset >= self.cut_start + shift else self.head


def state_path(console: Path) -> Path:
    return console.with_name(console.name + ".cut")


def read_cut_state(console: Path) -> CutState:
    try:
        return CutState(**json.loads(state_path(console).read_text()))
    except FileNotFoundError:
        return CutState()
    except (OSError, ValueError, TypeError):
        return CutState(cutting=True)  # unreadable: treat as "under way" until rewritten


def _write_state(console: Path, state: CutState) -> None:
    partial = state_path(console).with_suffix(".cut.partial")
    partial.write_text(json.dumps(asdict(state)))
    os.replace(partial, state_path(console))


def settle(console: Path) -> None:
    """Mark a cut left half-done (the daemon died during it) as done, once nothing
    writes the file any more, so readers stop waiting for it."""
    state = read_cut_state(console)
    if state.cutting and state_path(console).exists():
        _write_state(console, CutState(**{**asdict(state), "cutting": False}))


def _marker(dropped: int, block: int, max_bytes: int) -> bytes:
    text = (
        f"\n[orchestrator: {dropped} bytes of console output cut here; the log keeps its first "
        f"{HEAD_BYTES // 1024} KiB and its newest part within CONSOLE_MAX_BYTES={max_bytes}]"
    ).encode()
    return text.ljust(block - 1, b" ") + b"\n"


def _collapse(fd: int, offset: int, length: int) -> bool:
    if _libc.fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code))


def cap_console(console: Path, *, max_bytes: int) -> int:
    """Cut `console` back to about half of `max_bytes` when it is larger; the number of
    bytes its newest part moved (0: nothing to do). Blocking: call from a thread. Only
    the one follower of a running job calls it."""
    with console.open("r+b") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        if size <= max_bytes:
            return 0
        before = read_cut_state(console)
        block = before.block if before.shift else max(512, os.fstatvfs(fd).f_bsize)
        head = before.head if before.shift else -(-HEAD_BYTES // block) * block
        start = head + block
        end = (size - max_bytes // 2) // block * block
        if end <= start:
            return 0
        shift = end - start
        dropped = before.dropped + shift + (0 if before.shift else block)  # the first cut also covers the marker
        after = CutState(shift=before.shift + shift, dropped=dropped, head=head, block=block)
        _write_state(console, CutState(**{**asdict(before), "head": head, "block": block, "cutting": True}))
        os.pwrite(fd, _marker(dropped, block, max_bytes), head)
        if not _collapse(fd, start, shift):
            _rewrite_without(fd, start, end)
        _write_state(console, after)
        return shift


def _rewrite_without(fd: int, start: int, end: int) -> None:
    """Where the file system cannot collapse a range: copy the newest part down and
    truncate. Bytes the writer appends during the copy can be lost."""
    size = os.fstat(fd).st_size
    read_at, write_at = end, start
    while read_at < size:
        chunk = os.pread(fd, min(1024 * 1024, size - read_at), read_at)
        if not chunk:
            break
        os.pwrite(fd, chunk, write_at)
        read_at += len(chunk)
        write_at += len(chunk)
    os.ftruncate(fd, write_at)
