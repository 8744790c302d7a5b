"""Puts the fake illumos tools (`illumos.py`) on disk as `zonecfg`, `zoneadm` and `zfs`."""

from __future__ import annotations

import sys
from pathlib import Path

FAKE = Path(__file__).with_name("illumos.py")


def install_fake_illumos_tools(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A `bin` directory with the three tools, and the environment they need (their
    state file and zvol device root under `tmp_path`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("zonecfg", "zoneadm", "zfs"):
        wrapper = bin_dir / tool
        wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} {tool} "$@"\n')
        wrapper.chmod(0o755)
    env = {"FAKE_ILLUMOS_STATE": str(tmp_path / "illumos.json"), "FAKE_ZVOL_ROOT": str(tmp_path / "dev")}
    return bin_dir, env
