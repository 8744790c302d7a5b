"""Image preparation benchmark: `zstd -d` to disk vs our prepare (download + in-stream
zstd + sha256 + format check + fsync + rename) from file:// and from a loopback HTTP
server (a separate process), on >= 512 MiB of disk-image-like data (the machine's own
binaries and libraries from /usr/lib: compressible, not trivial).
Prints MiB/s of image written and the ratios. Run: .venv/bin/python bench/images.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.core.imagemap import parse_image_map
from orchestrator.core.images import ImagePreparer

WORK = Path("/var/cache/orchestrator/bench-images")
MIB = 2**20


def make_corpus(size: int) -> Path:
    raw, zst = WORK / "corpus.raw", WORK / "corpus.raw.zst"
    if zst.exists() and raw.exists() and raw.stat().st_size == size:
        return zst
    WORK.mkdir(parents=True, exist_ok=True)
    written = 0
    with raw.open("wb") as out:
        for path in sorted(Path("/usr/lib").rglob("*")):
            if written >= size:
                break
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()[: size - written]
                out.write(data)
                written += len(data)
    if written < size:
        raise SystemExit(f"only {written} bytes of corpus found under /usr/lib")
    subprocess.run(["zstd", "-q", "-f", "-3", "-T0", str(raw), "-o", str(zst)], check=True)
    return zst


def timed(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def zstd_cli(zst: Path, out: Path) -> None:
    subprocess.run(["zstd", "-q", "-d", "-f", str(zst), "-o", str(out)], check=True)
    with out.open("rb") as f:  # the same durability as ours
        os.fsync(f.fileno())


def ours(source: str, image_dir: Path) -> None:
    async def run() -> None:
        text = (
            f"default_label: b\nimages:\n  b:\n    backend: noop\n    local_path: {image_dir}/b.raw\n"
            f"    source: {source}\n    decompress: zstd\n    format: raw\n"
        )
        preparer = ImagePreparer(parse_image_map(text, filename="bench", base_dir=image_dir), image_dir=image_dir)
        await preparer.prepare("b", refresh=True)
        await preparer.close()

    (image_dir / "b.raw").unlink(missing_ok=True)
    asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    zst = make_corpus(args.mib * MIB)
    size = (WORK / "corpus.raw").stat().st_size
    out_dir = WORK / "out"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(WORK)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        cli = timed(lambda: zstd_cli(zst, out_dir / "cli.raw"), args.runs)
        from_file = timed(lambda: ours(f"file://{zst}", out_dir), args.runs)
        from_http = timed(lambda: ours(f"http://127.0.0.1:{port}/{zst.name}", out_dir), args.runs)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(out_dir, ignore_errors=True)
    rate = lambda seconds: size / MIB / seconds  # noqa: E731
    print(f"corpus: {size / MIB:.0f} MiB of /usr/lib binaries, {zst.stat().st_size / MIB:.0f} MiB as zstd -3")
    print(f"floor  zstd -d (CLI) to disk:         {rate(cli):7.0f} MiB/s")
    print(
        f"ours   prepare from file://:           {rate(from_file):7.0f} MiB/s  = {cli / from_file:.2f}x the CLI's throughput"
    )
    print(
        f"ours   prepare from loopback HTTP:     {rate(from_http):7.0f} MiB/s  = {from_http / from_file:.2f}x the time of file:// (download overlapped)"
    )


if __name__ == "__main__":
    main()
