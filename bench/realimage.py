"""A real cloud image for the benchmarks: Debian bookworm with Debian's own cloud-init.

Built once with debootstrap from the Debian mirror (as root; cached in OUT, default
/var/cache/orchestrator/bench-bookworm, rebuilt only when this recipe changes):
  base.qcow2       an ext4 root file system (label `root`) made from the debootstrap tree
                   with `mkfs.ext4 -d`: no loop device, no partition table
  vmlinuz          Debian's kernel (linux-image-amd64, as in Debian's `generic` cloud
                   images; the `cloud` kernel has no vmgenid), for direct kernel boot
  initrd.img       its initramfs (initramfs-tools, Debian's defaults), which finds the
                   root disk by label
  image-map.yaml   the label `bookworm`: libvirt, 1 vCPU, 1 GiB, no checkout

The guest is what a Debian cloud image boots: systemd, udev, cloud-init with the NoCloud
datasource reading the orchestrator's seed CD-ROM (`cidata`), running the job's
`#!/bin/sh` user-data from its `scripts-user` module. Nothing is tuned for speed: the
figures are what a team gets from a stock image.

Usage: python bench/realimage.py [OUT]   (bench/start_latency.py --real calls it)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
# Installed with apt inside the debootstrap tree (debootstrap's own resolver misses
# dependencies of a set this large).
PACKAGES = [
    "systemd-sysv",
    "udev",
    "kmod",
    "linux-image-amd64",
    "initramfs-tools",
    "cloud-init",
    "e2fsprogs",
    "iproute2",
    "ifupdown",
    "isc-dhcp-client",
    "procps",
]
DISK_SIZE = "3G"
DEFAULT_OUT = Path("/var/cache/orchestrator/bench-bookworm")

FILES = {
    "etc/fstab": "LABEL=root / ext4 defaults,discard 0 1\n",
    "etc/hostname": "debian\n",
    "etc/hosts": "127.0.0.1 localhost\n127.0.1.1 debian\n",
    # A NoCloud seed is all there is: look for it, nothing else.
    "etc/cloud/cloud.cfg.d/90_datasource.cfg": "datasource_list: [NoCloud, None]\n",
}
# Keeps package scripts from starting services inside the build tree (removed after).
POLICY_RC = "#!/bin/sh\nexit 101\n"

MAP = """\
# The benchmark's real cloud image (bench/realimage.py): Debian bookworm, Debian's cloud-init.
default_label: bookworm
images:
  bookworm:
    backend: libvirt
    local_path: {out}/base.qcow2
    format: qcow2
    checkout: false
    cpus: 1
    memory_mb: 1024
    disk_gb: 4
    timeout_s: 900
    boot_timeout_s: 600
    kernel: {out}/vmlinuz
    initrd: {out}/initrd.img
    cmdline: root=LABEL=root rw console=ttyS0
"""


def recipe_key() -> str:
    text = repr((MIRROR, SUITE, PACKAGES, DISK_SIZE, FILES, MAP)) + Path(__file__).read_text()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run(*argv: str) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


@contextlib.contextmanager
def mounted(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev in the build tree while packages install (some maintainer
    scripts read them), unmounted whatever happens."""
    done: list[Path] = []
    try:
        for source, target, kind in (("proc", "proc", "proc"), ("sysfs", "sys", "sysfs"), ("/dev", "dev", None)):
            where = root / target
            where.mkdir(exist_ok=True)
            run("mount", *(["--bind", source] if kind is None else ["-t", kind, source]), str(where))
            done.append(where)
        yield
    finally:
        for where in reversed(done):
            subprocess.run(["umount", "-l", str(where)], check=False)


def build(out: Path = DEFAULT_OUT) -> Path:
    """Build the image in `out` unless it is there already; the image map's path."""
    stamp = out / f".built-{recipe_key()}"
    if stamp.exists():
        return out / "image-map.yaml"
    if os.geteuid() != 0:
        raise SystemExit("realimage: building the Debian image needs root (debootstrap)")
    for tool, package in (("debootstrap", "debootstrap"), ("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            run("apt-get", "install", "-y", "-q", package)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix="build-") as scratch_dir:
        root = Path(scratch_dir) / "rootfs"
        run("debootstrap", "--variant=minbase", SUITE, str(root), MIRROR)
        for relative, text in FILES.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        policy = root / "usr/sbin/policy-rc.d"
        policy.write_text(POLICY_RC)
        policy.chmod(0o755)
        with mounted(root):
            chroot = ("chroot", str(root), "env", "DEBIAN_FRONTEND=noninteractive")
            run(*chroot, "apt-get", "update", "-q")
            run(*chroot, "apt-get", "install", "-y", "-q", *PACKAGES)
            run(*chroot, "apt-get", "clean")
        policy.unlink()
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        initrds = sorted((root / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise SystemExit(f"realimage: no kernel or initramfs in {root / 'boot'}")
        shutil.copyfile(kernels[-1], out / "vmlinuz.tmp")
        shutil.copyfile(initrds[-1], out / "initrd.img.tmp")
        raw = Path(scratch_dir) / "disk.raw"
        run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(root), str(raw), DISK_SIZE)
        run("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(out / "base.qcow2.tmp"))
    for name in ("vmlinuz", "initrd.img", "base.qcow2"):
        os.replace(out / f"{name}.tmp", out / name)
    (out / "image-map.yaml").write_text(MAP.format(out=out))
    for old in out.glob(".built-*"):
        old.unlink()
    stamp.touch()
    print(f"realimage: Debian {SUITE} with cloud-init built in {out}")
    return out / "image-map.yaml"


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT))
