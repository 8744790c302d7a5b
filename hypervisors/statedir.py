"""The layout of a host's state directory (`STATE_DIR`): the one place that names its files.

```
STATE_DIR/            0750
  state.db            the job journal (SQLite, WAL)
  logs/<job>.console  each job's console log (its live log, kept after the job)
  overlays/           per-job disk overlays (libvirt)
  seeds/              per-job NoCloud seed ISOs and zonecfg scripts
  channels/           pool VMs' job ports (unix sockets; warm pools)
  templates/          saved pool VMs per image version (warm pools with snapshot: true)
  images/             base images, unless IMAGE_DIR says otherwise
```

Backends are given a `StateDir` and ask it for paths; they never build them themselves.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

STATE_DIR_MODE = 0o750
PRIVATE_FILE_MODE = 0o640  # files holding a job's env or output (seeds, consoles, images)
# Everything else the daemon creates (the journal, overlays, sidecars): no group write,
# nothing for others, whatever umask it was started with.
PRIVATE_UMASK = 0o027


def restrict_umask() -> None:
    """Tighten the process umask to at least `PRIVATE_UMASK` (called at start)."""
    os.umask(os.umask(PRIVATE_UMASK) | PRIVATE_UMASK)


# `job-<uuid>` (a job's VM) or `pool-<uuid>` (a warm pool VM): a VM name, and the stem
# of every per-VM file.
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
VM_FILE = re.compile(rf"^(?P<vm>(job|pool)-{_UUID})\.")
POOL_VM_PREFIX = "pool-"


def open_private(path: Path, *, append: bool = False) -> BinaryIO:
    """Open `path` for writing, created 0640 whatever the umask: seeds and consoles hold
    a job's env and output, which may carry tokens."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, PRIVATE_FILE_MODE)
    os.fchmod(fd, PRIVATE_FILE_MODE)
    return os.fdopen(fd, "ab" if append else "wb")


def vm_name_for(job_id: str) -> str:
    return f"job-{job_id}"


def pool_vm_name() -> str:
    return f"{POOL_VM_PREFIX}{uuid.uuid4()}"


def is_pool_vm(vm_name: str) -> bool:
    return vm_name.startswith(POOL_VM_PREFIX)


def vm_of_file(path: Path) -> str | None:
    """The VM a per-VM file belongs to, or None when it is not named like ours."""
    match = VM_FILE.match(path.name)
    return match.group("vm") if match else None


CHANNEL_NAME_CHARS = 12  # of a VM's name (the end of its uuid) in its job port's name


@dataclass(frozen=True)
class StateDir:
    root: Path

    @property
    def journal(self) -> Path:
        return self.root / "state.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def overlays(self) -> Path:
        return self.root / "overlays"

    @property
    def seeds(self) -> Path:
        return self.root / "seeds"

    @property
    def channels(self) -> Path:
        return self.root / "channels"

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def default_images(self) -> Path:
        return self.root / "images"

    def console(self, job_id: str) -> Path:
        return self.logs / f"{job_id}.console"

    def overlay(self, vm_name: str) -> Path:
        return self.overlays / f"{vm_name}.qcow2"

    def seed(self, vm_name: str) -> Path:
        return self.seeds / f"{vm_name}.iso"

    def channel(self, vm_name: str) -> Path:
        """A pool VM's job port. Short on purpose: a unix socket's path has 108 bytes."""
        return self.channels / f"{vm_name[-CHANNEL_NAME_CHARS:]}.sock"

    def channel_vm_suffix(self, path: Path) -> str | None:
        """The VM-name suffix a job port is named after, or None when it is not one."""
        stem, dot, suffix = path.name.rpartition(".")
        return stem if dot and suffix == "sock" and len(stem) == CHANNEL_NAME_CHARS else None

    def zonecfg(self, vm_name: str) -> Path:
        return self.seeds / f"{vm_name}.zonecfg"

    def create(self) -> None:
        """Make the directories (the root 0750 whatever the umask). Raises OSError."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, STATE_DIR_MODE)
        for sub in (self.logs, self.overlays, self.seeds, self.channels, self.templates):
            sub.mkdir(mode=STATE_DIR_MODE, exist_ok=True)
            os.chmod(sub, STATE_DIR_MODE)
        # Fail now, not at the first job, when the directory cannot be written.
        probe = self.root / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
