"""qcow2 overlays over a base image, with `qemu-img` run as a subprocess.

Why qemu-img and not libvirt storage volumes: volumes need a storage pool covering
STATE_DIR/overlays (one more thing to define, start and keep in step per host), while
`qemu-img create` is what libvirt would run underneath anyway. The base's format is
always stated (`-F`), never probed: probing a raw image a guest wrote to is how a guest
gets the host to open files of its choosing.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from hypervisors.base import BackendError, ImageFormat

GIB = 1024**3


async def _qemu_img(*args: str) -> str:
    try:
        process = await asyncio.create_subprocess_exec(
            "qemu-img", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
    except FileNotFoundError:
        raise BackendError("qemu-img is not installed (Debian package qemu-utils)") from None
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise BackendError(f"qemu-img {args[0]} failed: {stderr.decode(errors='replace').strip()}")
    return stdout.decode()


async def image_info(path: Path, image_format: ImageFormat | None = None) -> dict:
    args = ["info", "--output=json"]
    if image_format is not None:
        args += ["-f", image_format.value]
    return json.loads(await _qemu_img(*args, str(path)))


async def create_overlay(base: Path, base_format: ImageFormat, overlay: Path, disk_gb: int | None) -> None:
    """Create `overlay` backed by `base`; its virtual size is max(base, disk_gb)."""
    if not await asyncio.to_thread(base.is_file):
        raise BackendError(f"base image {base} does not exist (prepare the image first)")
    size_bytes = None
    if disk_gb is not None:
        info = await image_info(base, base_format)
        size_bytes = max(int(info["virtual-size"]), disk_gb * GIB)
    overlay.parent.mkdir(parents=True, exist_ok=True)
    partial = overlay.with_name(overlay.name + ".partial")
    args = ["create", "-q", "-f", "qcow2", "-F", base_format.value, "-b", str(base), str(partial)]
    if size_bytes is not None:
        args.append(str(size_bytes))
    try:
        await _qemu_img(*args)
        os.replace(partial, overlay)
    finally:
        partial.unlink(missing_ok=True)
