"""NoCloud seed ISO, built in-process with pycdlib (never by shelling out to mkisofs).

Volume label `cidata`; ISO 9660 level 3 names plus Joliet and Rock Ridge, so every
reader (cloud-init, the kernel's isofs, Windows' cloudbase-init) sees the lowercase
`user-data`, `meta-data` and optional `network-config`.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pycdlib

from hypervisors.base import SeedFiles
from hypervisors.statedir import open_private

_NAMES = (("USERDATA.;1", "user-data"), ("METADATA.;1", "meta-data"), ("NETCONFI.;1", "network-config"))


def write_seed_iso(seed: SeedFiles, path: Path) -> None:
    """Write the ISO to `path` atomically (a temporary file renamed into place)."""
    contents = {"user-data": seed.user_data, "meta-data": seed.meta_data, "network-config": seed.network_config}
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, rock_ridge="1.09", vol_ident="cidata", sys_ident="LINUX")
    try:
        for iso_name, name in _NAMES:
            data = contents[name]
            if data is None:
                continue
            iso.add_fp(io.BytesIO(data), len(data), "/" + iso_name, rr_name=name, joliet_path="/" + name)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open_private(partial) as target:  # it holds the job's env
            iso.write_fp(target)
    finally:
        iso.close()
    os.replace(partial, path)


def read_seed_iso(path: Path) -> dict[str, bytes]:
    """The files of a seed ISO by their Rock Ridge names (for tests and diagnostics)."""
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    try:
        files: dict[str, bytes] = {}
        for _, name in _NAMES:
            buffer = io.BytesIO()
            try:
                iso.get_file_from_iso_fp(buffer, rr_path="/" + name)
            except pycdlib.pycdlibexception.PyCdlibInvalidInput:
                continue
            files[name] = buffer.getvalue()
        return files
    finally:
        iso.close()


def volume_label(path: Path) -> str:
    with path.open("rb") as iso:
        iso.seek(16 * 2048 + 40)
        return iso.read(32).decode("ascii").strip()
