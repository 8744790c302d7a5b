"""Run the guest's user-data script off a VM: its sandbox hooks (see `hypervisors.guest`)
pointed at a test's own console file, work directory and poweroff command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from hypervisors.guest import SANDBOX_HOOKS


def _assign(text: str, name: str, value: str) -> str:
    line = f"{name}={shlex.quote(value)}"
    text, found = re.subn(rf"^{name}=.*$", lambda _: line, text, flags=re.MULTILINE)
    if found != 1:
        raise ValueError(f"the user-data assigns {name} on {found} lines, not 1: the sandbox hook moved")
    return text


def sandbox_user_data(script: bytes, *, console: Path, workdir: Path, poweroff: str) -> str:
    """`script` with each hook's assignment line replaced. Raises ValueError unless each
    hook is assigned on exactly one line: a replacement that silently missed would run
    the real `poweroff -f` on the test host."""
    values = {"orch_console": str(console), "orch_workdir": str(workdir), "orch_poweroff": poweroff}
    if set(values) != set(SANDBOX_HOOKS):
        raise ValueError(f"the guest's sandbox hooks are now {SANDBOX_HOOKS}, not {sorted(values)}")
    text = script.decode()
    for name, value in values.items():
        text = _assign(text, name, value)
    return text
