"""The daemon's open-file limit.

Jobs need descriptors (console files, the journal, broker and libvirt sockets) and HTTP
clients take some too; the soft `RLIMIT_NOFILE` of a process started by hand is often
1024 while its hard limit is far higher, so the daemon raises the soft limit to the hard
one at start (systemd sets both with `LimitNOFILE=`).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

# What to ask for when the hard limit is "unlimited": Linux refuses an infinite soft
# limit for descriptors (it is capped by fs.nr_open).
UNLIMITED_SOFT_NOFILE = 1 << 20


@dataclass(frozen=True)
class OpenFilesLimit:
    before: int
    soft: int
    hard: int


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise this process's soft `RLIMIT_NOFILE` to its hard limit (as far as the kernel
    lets it); returns the limit before and after. Never lowers it, never raises."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_SOFT_NOFILE if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # e.g. above fs.nr_open: keep what we have, the log shows it
    now, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFilesLimit(before=soft, soft=now, hard=hard)
