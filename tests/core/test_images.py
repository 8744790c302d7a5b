"""Image preparation against a real HTTP server on 127.0.0.1 serving real zstd files:
the happy paths, every fault with the old image left intact, concurrency and refresh."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import zstandard
from aiohttp import web

from orchestrator.core.imagemap import ImageEntry, ImageMap, parse_image_map
from orchestrator.core.images import (
    ImageMeta,
    ImagePreparer,
    ImagePrepError,
    Outcome,
    PrepState,
    describe_image,
)
from orchestrator.core.messages import JobStatus


def disk_like_bytes(size: int, seed: int = 1) -> bytes:
    """Compressible but not trivial: runs of text-like and random-like blocks."""
    rng = random.Random(seed)
    words = [bytes(rng.choices(range(97, 123), k=rng.randint(2, 9))) for _ in range(500)]
    out = bytearray()
    while len(out) < size:
        if rng.random() < 0.3:
            out += rng.randbytes(4096)
        else:
            out += b" ".join(rng.choices(words, k=700))[:4096]
    return bytes(out[:size])


class ImageServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.conditional: list[bool] = []  # per request: did it ask "has it changed?"
        self.release = asyncio.Event()
        self.release.set()
        self.mid_download = asyncio.Event()
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        mode, name = request.match_info["mode"], request.match_info["name"]
        self.requests[name] += 1
        self.conditional.append("If-None-Match" in request.headers or "If-Modified-Since" in request.headers)
        if mode == "status":
            return web.Response(status=int(name))
        body = self.files[name]
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers={"ETag": etag})
        response = web.StreamResponse(headers={"ETag": etag, "Content-Length": str(len(body))})
        await response.prepare(request)
        half = len(body) // 2
        if mode == "reset":
            await response.write(body[:half])
            request.transport.abort()
            return response
        if mode == "truncate":  # a clean close, one byte short
            await response.write(body[:-1])
            request.transport.close()
            return response
        if mode == "slow":
            await response.write(body[:half])
            self.mid_download.set()
            await self.release.wait()
            await response.write(body[half:])
            return response
        await response.write(body)
        return response

    async def __aenter__(self) -> ImageServer:
        app = web.Application()
        app.router.add_get("/{mode}/{name}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await self.runner.cleanup()


@pytest.fixture
async def server():
    async with ImageServer() as running:
        yield running


RAW = disk_like_bytes(3 * 1024 * 1024)
RAW_ZST = zstandard.ZstdCompressor(level=3).compress(RAW)


def map_for(tmp_path: Path, entry: str) -> ImageMap:
    text = f"default_label: img\nimages:\n  img:\n    backend: noop\n    local_path: {tmp_path}/images/img.raw\n{entry}"
    return parse_image_map(text, filename="map.yaml", base_dir=tmp_path)


def preparer_for(tmp_path: Path, entry: str, **kwargs) -> ImagePreparer:
    return ImagePreparer(map_for(tmp_path, entry), image_dir=tmp_path / "images", **kwargs)


def target(tmp_path: Path) -> Path:
    return tmp_path / "images" / "img.raw"


def no_partials(tmp_path: Path) -> bool:
    return not [p for p in (tmp_path / "images").iterdir() if p.name.endswith(".partial")]


async def test_raw_image_downloads_verifies_and_installs(server, tmp_path):
    server.files["a.raw"] = RAW
    sha = hashlib.sha256(RAW).hexdigest()
    preparer = preparer_for(tmp_path, f"    source: {server.url}/files/a.raw\n    sha256: {sha}\n    format: raw\n")
    assert await preparer.prepare("img") is Outcome.DOWNLOADED
    assert target(tmp_path).read_bytes() == RAW
    meta = ImageMeta.read(target(tmp_path))
    assert meta.sha256 == sha and meta.format == "raw" and meta.etag
    assert await preparer.prepare("img") is Outcome.PRESENT
    await preparer.close()


async def test_zstd_image_is_decompressed_in_the_stream_over_http_and_file(server, tmp_path):
    server.files["a.raw.zst"] = RAW_ZST
    (tmp_path / "a.raw.zst").write_bytes(RAW_ZST)
    sha = hashlib.sha256(RAW_ZST).hexdigest()  # of the downloaded (compressed) bytes
    for source in (f"{server.url}/files/a.raw.zst", f"file://{tmp_path}/a.raw.zst"):
        target(tmp_path).unlink(missing_ok=True)
        preparer = preparer_for(tmp_path, f"    source: {source}\n    decompress: zstd\n    sha256: {sha}\n")
        assert await preparer.prepare("img") is Outcome.DOWNLOADED
        assert target(tmp_path).read_bytes() == RAW
        assert not [p for p in (tmp_path / "images").iterdir() if p.suffix == ".zst"]
        await preparer.close()


def frame_of_exactly(size: int, seed: int) -> bytes:
    """One zstd frame whose compressed size is exactly `size` (random data is stored raw)."""
    data = random.Random(seed).randbytes(size)
    for length in range(size - 256, size):
        frame = zstandard.ZstdCompressor(level=1).compress(data[:length])
        if len(frame) == size:
            return frame
    raise AssertionError(f"no frame of exactly {size} bytes")


async def test_multi_frame_zstd_decompresses_also_when_a_frame_ends_at_a_read_boundary(tmp_path):
    from orchestrator.core.images import CHUNK

    # The file:// source reads CHUNK bytes at a time, so the first frame ends exactly
    # where a read ends; the second frame is split across reads.
    first = frame_of_exactly(CHUNK, seed=3)
    second = zstandard.ZstdCompressor(level=3).compress(RAW)
    source = tmp_path / "multi.raw.zst"
    source.write_bytes(first + second)
    preparer = preparer_for(tmp_path, f"    source: file://{source}\n    decompress: zstd\n")
    assert await preparer.prepare("img") is Outcome.DOWNLOADED
    expected = zstandard.ZstdDecompressor().decompress(first) + RAW
    assert target(tmp_path).read_bytes() == expected
    source.write_bytes(first + second[: len(second) // 2])
    with pytest.raises(ImagePrepError, match="truncated zstd data"):
        await preparer.prepare("img", refresh=True)
    assert target(tmp_path).read_bytes() == expected
    await preparer.close()


async def test_decompression_bomb_is_stopped_without_holding_its_output_in_memory(tmp_path):
    import tracemalloc

    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(1024 * 1024**2))  # 1 GiB of zeros in ~32 KiB
    source = tmp_path / "bomb.raw.zst"
    source.write_bytes(bomb)
    preparer = preparer_for(tmp_path, f"    source: file://{source}\n    decompress: zstd\n", max_image_bytes=1024**2)
    tracemalloc.start()
    try:
        with pytest.raises(ImagePrepError, match="decompression bomb"):
            await preparer.prepare("img")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(bomb) < 1024**2 and peak < 128 * 1024**2
    await preparer.close()


def with_old_image(tmp_path: Path) -> None:
    target(tmp_path).parent.mkdir(parents=True, exist_ok=True)
    target(tmp_path).write_bytes(b"old image")


@pytest.mark.parametrize(
    ("path", "entry_extra", "files", "kwargs", "message"),
    [
        ("status/404", "", {}, {}, "HTTP 404 Not Found"),
        ("status/500", "", {}, {}, "HTTP 500 Internal Server Error"),
        ("reset/a.raw", "", {"a.raw": RAW}, {}, "broke off"),
        ("truncate/a.raw", "", {"a.raw": RAW}, {}, "Not enough data to satisfy content length"),
        ("files/t.zst", "    decompress: zstd\n", {"t.zst": RAW_ZST[: len(RAW_ZST) // 2]}, {}, "truncated zstd data"),
        (
            "files/c.zst",
            "    decompress: zstd\n",
            {"c.zst": b"\x28\xb5\x2f\xfd" + os.urandom(4096)},
            {},
            "corrupt zstd data",
        ),
        ("files/a.raw", "    sha256: " + "ab" * 32 + "\n", {"a.raw": RAW}, {}, "sha256 mismatch"),
        (
            "files/a.raw.zst",
            "    decompress: zstd\n",
            {"a.raw.zst": RAW_ZST},
            {"max_image_bytes": 1024 * 1024},
            "decompression bomb",
        ),
        ("files/a.raw", "", {"a.raw": RAW}, {"min_free_bytes": 1 << 62}, "not enough free disk"),
        (
            "files/a.raw",
            "    format: qcow2\n",
            {"a.raw": RAW},
            {},
            "format mismatch: the image map says qcow2, the file is raw",
        ),
    ],
)
async def test_fault_gives_clear_error_and_keeps_the_old_image(
    server, tmp_path, path, entry_extra, files, kwargs, message
):
    server.files.update(files)
    with_old_image(tmp_path)
    preparer = preparer_for(tmp_path, f"    source: {server.url}/{path}\n{entry_extra}", **kwargs)
    with pytest.raises(ImagePrepError) as error:
        await preparer.prepare("img", refresh=True)
    # The old file has no record of where it came from, so it was stale to begin with.
    assert str(error.value).startswith(
        "image 'img' is stale (no record of where it came from) and could not be prepared: "
    )
    assert message in str(error.value)
    assert target(tmp_path).read_bytes() == b"old image"
    assert str(preparer.state("img")) == "stale (no record of where it came from)"
    assert no_partials(tmp_path)
    await preparer.close()


async def test_unsupported_scheme_and_path_outside_image_dir_are_refused(tmp_path):
    preparer = preparer_for(tmp_path, "    source: file:///x\n")
    preparer._image_map.images["img"] = ImageEntry.model_construct(
        **{**preparer._image_map.images["img"].__dict__, "source": "ftp://example.invalid/x.img"}
    )
    with pytest.raises(ImagePrepError, match="unsupported URL scheme 'ftp'"):
        await preparer.prepare("img")
    outside = ImagePreparer(preparer._image_map, image_dir=tmp_path / "elsewhere")
    outside._image_map.images["img"] = ImageEntry.model_construct(
        **{**preparer._image_map.images["img"].__dict__, "source": "file:///x"}
    )
    with pytest.raises(ImagePrepError, match=r"local_path .* is outside image_dir"):
        await outside.prepare("img")


@pytest.mark.parametrize("how", ["the file", "its directory"])
@pytest.mark.parametrize("source", [False, True])
async def test_a_local_path_whose_symlink_leaves_image_dir_is_refused_never_ready(tmp_path, how, source):
    secret = tmp_path / "outside" / "shadow"
    secret.parent.mkdir()
    secret.write_bytes(b"root:$6$...")
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    if how == "the file":
        (image_dir / "img.raw").symlink_to(secret)
    else:
        (image_dir / "sub").symlink_to(secret.parent)
        (image_dir / "sub" / "img.raw").symlink_to(secret)
    local_path = image_dir / ("img.raw" if how == "the file" else "sub/img.raw")
    (tmp_path / "a.raw").write_bytes(RAW)
    entry = f"    source: file://{tmp_path}/a.raw\n" if source else ""
    text = f"default_label: img\nimages:\n  img:\n    backend: noop\n    local_path: {local_path}\n{entry}"
    image_map = parse_image_map(text, filename="map.yaml", base_dir=tmp_path)
    preparer = ImagePreparer(image_map, image_dir=image_dir)
    refusal = f"local_path {local_path} resolves to {secret}, outside image_dir {image_dir}"
    assert str(preparer.state("img")) == f"failed: {refusal}"
    with pytest.raises(ImagePrepError) as error:
        await preparer.ensure("img")
    assert str(error.value) == f"image 'img' could not be prepared: {refusal}"
    with pytest.raises(ImagePrepError, match="outside image_dir"):
        await preparer.prepare("img", refresh=True)
    line = describe_image("img", image_map.images["img"], image_dir=image_dir)
    assert line.startswith(f"img: failed: {refusal} {local_path} - format=? sha256=-")
    assert secret.read_bytes() == b"root:$6$..." and not preparer.state("img").ready
    await preparer.close()


async def test_symlinks_and_fifos_beside_an_image_are_neither_followed_nor_waited_on(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not touch")
    (tmp_path / "a.raw").write_bytes(RAW)
    preparer = preparer_for(tmp_path, f"    source: file://{tmp_path}/a.raw\n")
    await preparer.prepare("img")
    sidecar = target(tmp_path).with_name("img.raw.meta.json")
    sidecar.unlink()
    os.mkfifo(sidecar)  # opening it for reading would block the event loop
    assert str(preparer.state("img")) == "stale (no record of where it came from)"
    sidecar.unlink()
    sidecar.symlink_to(secret)
    assert str(preparer.state("img")) == "stale (no record of where it came from)"
    lock = target(tmp_path).with_name("img.raw.lock")
    lock.unlink(missing_ok=True)
    lock.symlink_to(secret)
    with pytest.raises(ImagePrepError, match=r"img.raw.lock is a symlink; remove it"):
        await preparer.prepare("img")
    lock.unlink()
    assert await preparer.prepare("img") is Outcome.DOWNLOADED
    assert not sidecar.is_symlink() and preparer.state("img").ready
    assert secret.read_bytes() == b"do not touch"
    await preparer.close()


async def test_installed_images_and_records_are_0640_whatever_the_umask(server, tmp_path):
    server.files["a.raw"] = RAW
    source = tmp_path / "a.raw"
    source.write_bytes(RAW)
    source.chmod(0o644)
    old_umask = os.umask(0)
    try:
        for url in (f"file://{source}", f"{server.url}/files/a.raw"):
            target(tmp_path).unlink(missing_ok=True)
            preparer = preparer_for(tmp_path, f"    source: {url}\n")
            assert await preparer.prepare("img") is Outcome.DOWNLOADED
            await preparer.close()
            for path in (target(tmp_path), target(tmp_path).with_name("img.raw.meta.json")):
                assert stat.S_IMODE(path.stat().st_mode) == 0o640, path
    finally:
        os.umask(old_umask)


async def test_concurrent_prepares_across_tasks_and_processes_download_once(server, tmp_path):
    server.files["a.raw"] = RAW
    server.release.clear()
    entry = f"    source: {server.url}/slow/a.raw\n"
    preparer = preparer_for(tmp_path, entry)
    (tmp_path / "map.yaml").write_text(
        f"default_label: img\nimages:\n  img:\n    backend: noop\n    local_path: {tmp_path}/images/img.raw\n{entry}"
    )
    # Three tasks here and the CLI in another process, all while the download is under way.
    tasks = [asyncio.create_task(preparer.prepare("img")) for _ in range(2)] + [
        asyncio.create_task(preparer.ensure("img"))
    ]
    await asyncio.wait_for(server.mid_download.wait(), 10)
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "images",
        "prepare",
        "img",
        "--config",
        str(tmp_path / "map.yaml"),
        "--image-dir",
        str(tmp_path / "images"),
        cwd=Path(__file__).resolve().parents[2],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    waiting = await asyncio.wait_for(cli.stderr.readline(), 30)
    assert b"another process is preparing this image" in waiting
    server.release.set()
    outcomes = await asyncio.gather(*tasks)
    out, _ = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0 and "img: present" in out.decode()
    assert server.requests["a.raw"] == 1
    assert sorted(str(o) for o in outcomes[:2]) == ["Outcome.DOWNLOADED", "Outcome.PRESENT"]
    assert target(tmp_path).read_bytes() == RAW
    await preparer.close()


async def test_refresh_replaces_only_on_change_and_running_readers_keep_the_old_file(server, tmp_path):
    server.files["a.raw"] = RAW
    preparer = preparer_for(tmp_path, f"    source: {server.url}/files/a.raw\n")
    await preparer.prepare("img")
    inode = target(tmp_path).stat().st_ino
    assert await preparer.prepare("img", refresh=True) is Outcome.UNCHANGED
    assert target(tmp_path).stat().st_ino == inode and server.requests["a.raw"] == 2
    running_vm = target(tmp_path).open("rb")
    server.files["a.raw"] = disk_like_bytes(len(RAW), seed=2)
    assert await preparer.prepare("img", refresh=True) is Outcome.DOWNLOADED
    assert target(tmp_path).read_bytes() == server.files["a.raw"]
    assert running_vm.read() == RAW
    running_vm.close()
    await preparer.close()


NEW = disk_like_bytes(len(RAW), seed=2)
RAW_SHA, NEW_SHA = hashlib.sha256(RAW).hexdigest(), hashlib.sha256(NEW).hexdigest()


async def test_a_new_sha256_in_the_map_makes_the_image_stale_and_refresh_fetches_it_whole(server, tmp_path):
    server.files["a.raw"] = RAW
    preparer = preparer_for(tmp_path, f"    source: {server.url}/files/a.raw\n    sha256: {RAW_SHA}\n")
    assert await preparer.prepare("img") is Outcome.DOWNLOADED
    assert preparer.state("img").ready
    preparer.update_map(map_for(tmp_path, f"    source: {server.url}/files/a.raw\n    sha256: {NEW_SHA}\n"))
    mismatch = f"stale (sha256 changed: the map pins {NEW_SHA}, the installed image is {RAW_SHA})"
    assert str(preparer.state("img")) == mismatch
    assert preparer.needs_preparation("img")
    # The server still has the old release: it would answer 304 to the old ETag, but the
    # preparer must not ask; it fetches the file and the pinned hash refuses it.
    with pytest.raises(ImagePrepError) as error:
        await preparer.prepare("img", refresh=True)
    assert str(error.value) == (
        f"image 'img' is {mismatch} and could not be prepared: "
        f"sha256 mismatch: the image map says {NEW_SHA}, the download is {RAW_SHA}"
    )
    assert server.conditional == [False, False]
    assert target(tmp_path).read_bytes() == RAW and str(preparer.state("img")) == mismatch
    with pytest.raises(
        ImagePrepError, match=r"is stale \(sha256 changed: .*\) and could not be prepared: sha256 mismatch"
    ):
        await preparer.ensure("img")
    server.files["a.raw"] = NEW  # the new release is published
    assert await preparer.prepare("img", refresh=True) is Outcome.DOWNLOADED
    assert target(tmp_path).read_bytes() == NEW and preparer.state("img").ready
    assert ImageMeta.read(target(tmp_path)).sha256 == NEW_SHA
    assert await preparer.prepare("img", refresh=True) is Outcome.UNCHANGED  # ready: may ask conditionally
    assert server.conditional == [False, False, False, False, True]
    await preparer.close()


async def test_a_stale_image_is_fetched_by_prepare_without_refresh_and_by_ensure(server, tmp_path):
    server.files["a.raw"], server.files["b.raw"] = RAW, NEW
    preparer = preparer_for(tmp_path, f"    source: {server.url}/files/a.raw\n")
    await preparer.prepare("img")
    preparer.update_map(map_for(tmp_path, f"    source: {server.url}/files/b.raw\n"))
    assert preparer.state("img").summary == "stale (source changed)"
    assert await preparer.prepare("img") is Outcome.DOWNLOADED
    assert target(tmp_path).read_bytes() == NEW
    preparer.update_map(map_for(tmp_path, f"    source: {server.url}/files/a.raw\n"))
    assert await preparer.ensure("img") == target(tmp_path)
    assert target(tmp_path).read_bytes() == RAW and preparer.state("img").ready
    assert await preparer.ensure("img") == target(tmp_path)  # ready: returns without a request
    assert server.requests == {"a.raw": 2, "b.raw": 1}
    await preparer.close()


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("source", "source changed"),
        ("format", "format changed"),
        ("decompress", "decompress changed"),
        ("no sidecar", "no record of where it came from"),
        ("corrupt sidecar", "no record of where it came from"),
        ("sidecar of another schema", "no record of where it came from"),
        ("file replaced by hand", "file changed"),
    ],
)
def test_an_installed_image_that_differs_from_its_entry_is_stale_with_the_reason(tmp_path, change, reason):
    (tmp_path / "a.raw.zst").write_bytes(RAW_ZST)
    (tmp_path / "copy.raw.zst").write_bytes(RAW_ZST)
    entry = f"    source: file://{tmp_path}/a.raw.zst\n    decompress: zstd\n"
    preparer = preparer_for(tmp_path, entry)
    asyncio.run(preparer.prepare("img"))
    assert preparer.state("img").ready
    sidecar = target(tmp_path).with_name("img.raw.meta.json")
    changed_entry = {
        "source": entry.replace("a.raw.zst", "copy.raw.zst"),
        "format": entry + "    format: qcow2\n",
        "decompress": f"    source: file://{tmp_path}/a.raw.zst\n",
    }.get(change, entry)
    preparer.update_map(map_for(tmp_path, changed_entry))
    if change == "no sidecar":
        sidecar.unlink()
    elif change == "corrupt sidecar":
        sidecar.write_text('{"source": "file:///x", "sha2')
    elif change == "sidecar of another schema":
        sidecar.write_text('{"source": "file:///x", "sha256": "00"}')
    elif change == "file replaced by hand":
        target(tmp_path).write_bytes(b"something else")
    state = preparer.state("img")
    assert state.state is PrepState.STALE and state.summary == f"stale ({reason})"
    assert preparer.needs_preparation("img")


async def test_a_missing_image_whose_preparation_failed_is_failed_until_the_map_changes(server, tmp_path):
    preparer = preparer_for(tmp_path, f"    source: {server.url}/status/404\n")
    assert str(preparer.state("img")) == "missing" and preparer.needs_preparation("img")
    with pytest.raises(ImagePrepError, match=r"^image 'img' could not be prepared: fetching .* HTTP 404"):
        await preparer.ensure("img")
    state = preparer.state("img")
    assert state.state is PrepState.FAILED and "HTTP 404 Not Found" in str(state) and preparer.needs_preparation("img")
    preparer.update_map(map_for(tmp_path, f"    source: {server.url}/status/500\n"))
    assert str(preparer.state("img")) == "missing"
    await preparer.close()


async def test_a_preparation_under_way_finishes_with_its_entry_and_the_new_map_judges_it(server, tmp_path):
    server.files["a.raw"] = RAW
    server.release.clear()
    preparer = preparer_for(tmp_path, f"    source: {server.url}/slow/a.raw\n    sha256: {RAW_SHA}\n")
    download = asyncio.create_task(preparer.prepare("img"))
    await asyncio.wait_for(server.mid_download.wait(), 10)
    preparer.update_map(map_for(tmp_path, f"    source: {server.url}/slow/a.raw\n    sha256: {NEW_SHA}\n"))
    assert preparer.state("img").state is PrepState.PREPARING
    server.release.set()
    assert await download is Outcome.DOWNLOADED
    assert target(tmp_path).read_bytes() == RAW
    assert preparer.state("img").summary == "stale (sha256 changed)"
    await preparer.close()


async def test_a_reader_never_sees_a_partial_file(server, tmp_path):
    server.files["a.raw"] = RAW
    with_old_image(tmp_path)
    server.release.clear()
    preparer = preparer_for(tmp_path, f"    source: {server.url}/slow/a.raw\n")
    download = asyncio.create_task(preparer.prepare("img", refresh=True))
    await asyncio.wait_for(server.mid_download.wait(), 10)
    assert target(tmp_path).read_bytes() == b"old image"
    assert preparer.state("img").state is PrepState.PREPARING
    server.release.set()
    assert await download is Outcome.DOWNLOADED
    assert target(tmp_path).read_bytes() == RAW
    await preparer.close()


def test_qcow2_format_is_detected(tmp_path):
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    from orchestrator.core.images import detect_format

    assert asyncio.run(detect_format(image)).value == "qcow2"


async def test_job_whose_image_cannot_be_prepared_gets_error_and_other_labels_work(
    server, daemon_factory, broker, tmp_path
):
    from orchestrator.core.imagemap import parse_image_map as parse
    from tests.conftest import NOOP_MAP

    broken = NOOP_MAP.replace(
        "  beta:\n    backend: noop\n    local_path: /nonexistent/beta.img\n",
        f"  beta:\n    backend: noop\n    local_path: {tmp_path}/host0/images/beta.img\n    source: {server.url}/status/404\n",
    )
    image_map = parse(broken, filename="map.yaml", base_dir=tmp_path)
    await daemon_factory(image_map)
    await broker.open()
    bad = await broker.submit(runs_on="beta")
    good = await broker.submit(runs_on="alpha")
    results = await broker.collect(2)
    assert results[bad.job_id].status is JobStatus.ERROR
    assert "image 'beta' could not be prepared: fetching" in results[bad.job_id].summary
    assert "HTTP 404" in results[bad.job_id].summary
    assert results[good.job_id].status is JobStatus.SUCCEEDED


async def test_job_for_an_image_the_map_no_longer_describes_gets_error_naming_the_mismatch(
    server, daemon_factory, broker, tmp_path
):
    from tests.conftest import NOOP_MAP

    server.files["beta.raw"] = RAW  # the old release, still served
    image_dir = tmp_path / "host0" / "images"

    def noop_map(sha: str) -> ImageMap:
        pinned = NOOP_MAP.replace(
            "  beta:\n    backend: noop\n    local_path: /nonexistent/beta.img\n",
            f"  beta:\n    backend: noop\n    local_path: {image_dir}/beta.img\n"
            f"    source: {server.url}/files/beta.raw\n    sha256: {sha}\n",
        )
        return parse_image_map(pinned, filename="map.yaml", base_dir=tmp_path)

    installer = ImagePreparer(noop_map(RAW_SHA), image_dir=image_dir)
    await installer.prepare("beta")
    await installer.close()
    await daemon_factory(noop_map(NEW_SHA))
    await broker.open()
    stale = await broker.submit(runs_on="beta")
    good = await broker.submit(runs_on="alpha")
    results = await broker.collect(2)
    assert results[stale.job_id].status is JobStatus.ERROR
    assert results[stale.job_id].summary.startswith(
        f"image 'beta' is stale (sha256 changed: the map pins {NEW_SHA}, the installed image is {RAW_SHA}) "
        f"and could not be prepared: sha256 mismatch"
    )
    assert results[good.job_id].status is JobStatus.SUCCEEDED


def test_images_cli_prepares_with_progress_lines_and_lists(tmp_path, capsys):
    from orchestrator.cli import main

    source = tmp_path / "src.raw.zst"
    source.write_bytes(RAW_ZST)
    image_dir = tmp_path / "images"
    config = tmp_path / "map.yaml"
    config.write_text(
        "default_label: img\nimages:\n  img:\n    backend: noop\n"
        f"    local_path: {image_dir}/img.raw\n    source: file://{source}\n    decompress: zstd\n"
    )
    assert main(["images", "prepare", "--config", str(config), "--image-dir", str(image_dir)]) == 0
    out = capsys.readouterr()
    assert f"img: downloaded ({image_dir}/img.raw)" in out.out
    assert main(["images", "prepare", "img", "--config", str(config), "--image-dir", str(image_dir)]) == 0
    assert "img: present" in capsys.readouterr().out
    assert main(["images", "prepare", "nope", "--config", str(config)]) == 2


def test_list_line_shows_the_state_beside_path_size_format_hash_source_and_fetch_time(tmp_path):
    source = tmp_path / "src.raw.zst"
    source.write_bytes(RAW_ZST)
    sha = hashlib.sha256(RAW_ZST).hexdigest()
    image_map = map_for(tmp_path, f"    source: file://{source}\n    decompress: zstd\n    sha256: {sha}\n")
    image = image_map.images["img"]
    line = describe_image("img", image, image_dir=tmp_path / "images")
    assert line == f"img: missing {target(tmp_path)} - format=? sha256=- source=file://{source} fetched=-"
    preparer = ImagePreparer(image_map, image_dir=tmp_path / "images")
    asyncio.run(preparer.prepare("img"))
    line = describe_image("img", image, image_dir=tmp_path / "images")
    assert line.startswith(
        f"img: ready {target(tmp_path)} 3 MiB format=raw sha256={sha} source=file://{source} fetched=20"
    )
    repinned = map_for(tmp_path, f"    source: file://{source}\n    decompress: zstd\n    sha256: {'ab' * 32}\n")
    preparer.update_map(repinned)
    line = describe_image("img", repinned.images["img"], image_dir=tmp_path / "images", state=preparer.state("img"))
    assert line.startswith(f"img: stale (sha256 changed) {target(tmp_path)} 3 MiB format=raw sha256={sha}")


def test_progress_printer_writes_plain_lines_off_a_terminal():
    import io

    from orchestrator.cli import ProgressPrinter
    from orchestrator.core.images import ImageStatus, PrepState

    stream = io.StringIO()
    printer = ProgressPrinter(stream, interval_s=0)
    printer(ImageStatus("img", PrepState.PREPARING, bytes_in=50 * 2**20, bytes_total=100 * 2**20, started_at=0.0))
    line = stream.getvalue()
    assert line.startswith("img: 50/100 MiB  50%") and "MiB/s" in line and "ETA" in line and "\r" not in line
