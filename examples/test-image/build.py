"""Build the tiny bootable test image: Debian's kernel + a busybox initramfs whose init
acts like cloud-init's NoCloud datasource for a `#!` user-data script.

Outputs (in OUT, default /var/cache/orchestrator/test-image):
  kernel              the Debian kernel for direct kernel boot: the uncompressed ELF
                      (vmlinux) with its PVH entry point, so QEMU starts it directly;
                      the compressed bzImage would spend ~3 s of every boot unpacking
                      itself under software emulation. (A kernel without a PVH entry is
                      kept as the bzImage it ships as.)
  initramfs.cpio.gz   busybox-static, the block/CD-ROM modules, and /init
  base.qcow2          an empty 1 GiB disk: the "cloud image" jobs get an overlay of
  image-map.yaml      an image map with the labels `demo` and `demo-silent`

/init mounts the seed (ISO 9660 volume id `cidata`), runs `user-data` when it starts
with `#!` (the orchestrator's job script, which prints its result line and powers off),
then powers off. With `orch_test=no-userdata` on the kernel command line it skips the
user-data, so tests can see a VM that stops without a result line.

Idempotent: a second run with the same inputs does nothing.
Usage: python examples/test-image/build.py [OUT]
"""

from __future__ import annotations

import gzip
import hashlib
import io
import lzma
import os
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

MODULES = ["virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "sr_mod", "cdrom", "isofs", "ata_piix", "ahci"]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /var/tmp /tmp
echo "test-image: up after $(cut -d' ' -f1 /proc/uptime)s"
for m in $(cat /lib/modules/load-order); do insmod /lib/modules/$m.ko 2>/dev/null; done
seed=
for try in $(seq 1 100); do
  for dev in /dev/sr* /dev/vd* /dev/sd*; do
    [ -b "$dev" ] || continue
    # ISO 9660 primary volume descriptor: sector 16, volume id at bytes 40..71
    label=$(dd if="$dev" bs=2048 skip=16 count=1 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null | tr -d ' ')
    case "$label" in cidata|CIDATA) seed=$dev; break 2;; esac
  done
  sleep 0.05
done
mkdir -p /seed
if [ -n "$seed" ] && mount -t iso9660 -o ro "$seed" /seed; then
  echo "test-image: NoCloud seed on $seed: $(sed -n 's/^instance-id: //p' /seed/meta-data)"
  if grep -q 'orch_test=no-userdata' /proc/cmdline; then
    echo "test-image: skipping user-data (orch_test=no-userdata)"
  elif head -c 2 /seed/user-data | grep -q '#!'; then
    cp /seed/user-data /tmp/user-data && chmod +x /tmp/user-data
    /tmp/user-data
  else
    echo "test-image: user-data is not a #! script; nothing to run"
  fi
else
  echo "test-image: no NoCloud seed found"
fi
sync
poweroff -f
"""

MAP = """\
# Image map for the demo and the libvirt tests: the tiny test image.
default_label: demo
images:
  demo: &test-image
    backend: libvirt
    local_path: {out}/base.qcow2
    format: qcow2
    checkout: false
    cpus: 1
    memory_mb: 256
    timeout_s: 300
    kernel: {out}/kernel
    initrd: {out}/initramfs.cpio.gz
    cmdline: console=ttyS0 panic=-1 quiet
  demo-silent:
    <<: *test-image
    # the guest skips the user-data: a VM that powers off without a result line
    cmdline: console=ttyS0 panic=-1 quiet orch_test=no-userdata
"""


def run(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd).stdout


def kernel_package() -> str:
    out = run("apt-cache", "depends", "linux-image-amd64")
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Depends: linux-image-"):
            return line.split()[1]
    raise SystemExit("build: cannot find the kernel package behind linux-image-amd64 (run apt-get update)")


# bzImage payload compressions, by the magic that starts the compressed vmlinux.
PAYLOAD_MAGIC = {b"\xfd7zXZ\x00": "xz", b"\x1f\x8b\x08": "gzip", b"\x28\xb5\x2f\xfd": "zstd"}
XEN_ELFNOTE_PHYS32_ENTRY = 18  # the PVH entry point QEMU's -kernel looks for in an ELF


def uncompressed_kernel(bzimage: bytes) -> bytes | None:
    """The vmlinux ELF inside a bzImage when it has a PVH entry point, else None.

    The payload is found by its compression's magic (what the kernel's own
    scripts/extract-vmlinux does); each candidate is unpacked until one is an ELF."""
    for magic, kind in PAYLOAD_MAGIC.items():
        at = bzimage.find(magic)
        while at >= 0:
            try:
                elf = _unpack(kind, bzimage[at:])
            except (lzma.LZMAError, OSError, EOFError, zlib.error, ValueError):
                elf = b""
            if elf.startswith(b"\x7fELF"):
                return elf if _has_pvh_entry(elf) else None
            at = bzimage.find(magic, at + 1)
    return None


def _unpack(kind: str, data: bytes) -> bytes:
    if kind == "xz":
        return lzma.LZMADecompressor().decompress(data)
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def _has_pvh_entry(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has a Xen note of type PHYS32_ENTRY."""
    if elf[4] != 2 or elf[5] != 1:  # ELFCLASS64, ELFDATA2LSB
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for index in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + index * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        at, end = offset, offset + filesz
        while at + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, at)
            name = elf[at + 12 : at + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            at += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def module_depends(blob: bytes) -> list[str]:
    # .modinfo holds NUL-separated key=value strings; `depends=` is what modules.dep records.
    at = blob.find(b"\0depends=")
    if at < 0:
        return []
    value = blob[at + 9 : blob.index(b"\0", at + 9)].decode()
    return [name.replace("-", "_") for name in value.split(",") if name]


def collect_modules(moddir: Path) -> list[tuple[str, bytes]]:
    index: dict[str, Path] = {}
    for path in moddir.rglob("*.ko*"):
        name = path.name.split(".ko")[0].replace("-", "_")
        index[name] = path
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name not in index:
            return
        seen.add(name)
        blob = module_bytes(index[name])
        for dep in module_depends(blob):
            visit(dep)
        ordered.append((name, blob))

    for name in MODULES:
        visit(name)
    return ordered


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio `newc` archive (what the kernel unpacks as initramfs) of (path, mode, data)."""
    out = io.BytesIO()

    def pad(n: int) -> None:
        out.write(b"\0" * ((4 - n % 4) % 4))

    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
        out.write(header + encoded)
        pad(len(header) + len(encoded))
        out.write(data)
        pad(len(data))
    return out.getvalue()


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    package = kernel_package()
    stamp_key = hashlib.sha256((package + INIT + MAP + Path(__file__).read_text()).encode()).hexdigest()[:16]
    stamp = out / f".built-{stamp_key}"
    if stamp.exists() and all((out / f).exists() for f in ("kernel", "initramfs.cpio.gz", "base.qcow2", "image-map.yaml")):
        print(f"test image up to date in {out}")
        return
    version = package.removeprefix("linux-image-")
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        run("apt-get", "download", package, cwd=scratch)
        deb = next(scratch.glob(f"{package}_*.deb"))
        run("dpkg-deb", "-x", str(deb), str(scratch / "root"))
        bzimage = (scratch / "root" / "boot" / f"vmlinuz-{version}").read_bytes()
        vmlinux = uncompressed_kernel(bzimage)
        (out / "kernel.tmp").write_bytes(vmlinux or bzimage)
        kernel_form = "uncompressed, PVH entry" if vmlinux else "bzImage: it has no PVH entry"
        modules = collect_modules(scratch / "root" / "lib" / "modules" / version)
    busybox = Path("/bin/busybox").read_bytes()
    directory = stat.S_IFDIR | 0o755
    entries: list[tuple[str, int, bytes]] = [
        (d, directory, b"") for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "var", "lib", "lib/modules")
    ]
    entries.append(("bin/busybox", stat.S_IFREG | 0o755, busybox))
    entries += [(f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, blob) for name, blob in modules]
    entries.append(("lib/modules/load-order", stat.S_IFREG | 0o644, "".join(f"{n}\n" for n, _ in modules).encode()))
    entries.append(("init", stat.S_IFREG | 0o755, INIT.encode()))
    (out / "initramfs.cpio.gz.tmp").write_bytes(gzip.compress(newc_archive(entries), 6))
    if not (out / "base.qcow2").exists():
        run("qemu-img", "create", "-q", "-f", "qcow2", str(out / "base.qcow2.tmp"), "1G")
        os.replace(out / "base.qcow2.tmp", out / "base.qcow2")
    os.replace(out / "kernel.tmp", out / "kernel")
    (out / "vmlinuz").unlink(missing_ok=True)  # what earlier versions of this script booted
    os.replace(out / "initramfs.cpio.gz.tmp", out / "initramfs.cpio.gz")
    (out / "image-map.yaml").write_text(MAP.format(out=out))
    for old in out.glob(".built-*"):
        old.unlink()
    stamp.touch()
    print(f"test image built in {out}: kernel {version} ({kernel_form}), modules {' '.join(n for n, _ in modules)}")


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "/var/cache/orchestrator/test-image"))
