"""Base images: download, decompress, verify and install them so a host always has a
complete image before a job needs it, and never a half-written one.

One preparation per image at a time, across tasks (an asyncio lock) and processes (a
file lock next to the image). The download streams: the network is read on the event
loop while one worker thread hashes the downloaded bytes, decompresses zstd in the same
stream and writes a temporary file in the image's directory; nothing compressed is kept
on disk. Then the `sha256` of the *downloaded* bytes is checked (as published next to
`.zst` files), the format is detected with `qemu-img info` and compared with the stated
one, the file is fsynced and renamed over `local_path`. A rename keeps running VMs on
the old inode; new jobs get the new file. Any failure leaves the old image in place.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
import queue
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

import aiohttp
import filelock
import zstandard

from hypervisors.base import ImageFormat
from orchestrator.imagemap import Decompress, ImageEntry, ImageMap
from orchestrator.logsetup import EventLogger

log = EventLogger("orchestrator.images")

CHUNK = 1024 * 1024
QUEUE_CHUNKS = 32  # up to 32 MiB downloaded ahead of the decompressor
ZSTD_SLICE = 2048  # zstd expands at most ~32768x: one slice is at most 64 MiB of output
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024**3
DEFAULT_MIN_FREE_BYTES = 256 * 1024**2
FREE_CHECK_EVERY = 64 * 1024**2


class ImagePrepError(Exception):
    """An image could not be prepared; the message names the image and the cause."""


class Outcome(str, enum.Enum):
    PRESENT = "present"  # already there, nothing asked
    DOWNLOADED = "downloaded"  # new or changed file installed
    UNCHANGED = "unchanged"  # refresh found the same image


class PrepState(str, enum.Enum):
    MISSING = "missing"
    PREPARING = "preparing"
    READY = "ready"
    FAILED = "failed"


@dataclass
class ImageStatus:
    label: str
    state: PrepState
    bytes_in: int = 0
    bytes_total: int | None = None
    bytes_out: int = 0
    started_at: float | None = None
    error: str | None = None

    @property
    def fraction(self) -> float | None:
        return self.bytes_in / self.bytes_total if self.bytes_total else None


@dataclass
class ImageMeta:
    """The sidecar `<local_path>.meta.json`: what was fetched, from where, when."""

    source: str
    sha256: str
    size: int
    format: str
    fetched_at: str
    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def read(cls, image: Path) -> ImageMeta | None:
        try:
            return cls(**json.loads(meta_path(image).read_text()))
        except (OSError, ValueError, TypeError):
            return None


def meta_path(image: Path) -> Path:
    return image.with_name(image.name + ".meta.json")


ProgressCallback = Callable[[ImageStatus], None]


# --- the writer thread ---------------------------------------------------------------------


@dataclass
class _SinkResult:
    sha256: str
    bytes_in: int
    bytes_out: int


class _Sink:
    """Consumes downloaded chunks in a worker thread: hash, decompress, write, guard."""

    def __init__(self, target: Path, *, zstd: bool, max_bytes: int, min_free: int, status: ImageStatus) -> None:
        self.target = target
        self.zstd = zstd
        self.max_bytes = max_bytes
        self.min_free = min_free
        self.status = status
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self.error: BaseException | None = None

    def run(self) -> _SinkResult:
        digest = hashlib.sha256()
        frames = _ZstdFrames() if self.zstd else None
        written = 0
        next_free_check = FREE_CHECK_EVERY
        ended = False
        try:
            with self.target.open("wb") as out:
                while (chunk := self.queue.get()) is not None:
                    digest.update(chunk)
                    self.status.bytes_in += len(chunk)
                    for data in frames.decompress(chunk) if frames is not None else (chunk,):
                        written += len(data)
                        if written > self.max_bytes:
                            raise ImagePrepError(
                                f"decompressed size passed max_image_bytes ({self.max_bytes} bytes): refusing a possible decompression bomb"
                            )
                        if written >= next_free_check:
                            next_free_check += FREE_CHECK_EVERY
                            check_free_space(self.target.parent, self.min_free, 0)
                        out.write(data)
                    self.status.bytes_out = written
                ended = True
                if frames is not None and not frames.complete:
                    raise ImagePrepError("truncated zstd data: the stream ended inside a frame")
                out.flush()
                os.fsync(out.fileno())
        except BaseException as exc:
            self.error = exc
            # Keep draining until the end marker so the producer never blocks.
            while not ended and self.queue.get() is not None:
                pass
            raise
        return _SinkResult(digest.hexdigest(), self.status.bytes_in, written)


class _ZstdFrames:
    """Decompresses a stream of one or more zstd frames and knows whether it ended between
    frames.

    One decompressobj per frame rather than zstandard's `read_across_frames=True`: in that
    mode `eof` never turns true, so a download cut off inside a frame would pass as a
    complete (short) image. Input goes in in ZSTD_SLICE pieces because one call returns
    everything its input expands to: a 1 MiB chunk of a zstd bomb is 32 GiB of output, in
    memory, before the size guard could look at it.
    """

    def __init__(self) -> None:
        self._frame = zstandard.ZstdDecompressor().decompressobj()

    @property
    def complete(self) -> bool:
        """True when the input so far ends exactly at the end of a frame."""
        return self._frame.eof

    def decompress(self, chunk: bytes) -> Iterator[bytes]:
        view = memoryview(chunk)
        for start in range(0, len(view), ZSTD_SLICE):
            data: memoryview | bytes = view[start : start + ZSTD_SLICE]
            while data:
                if self._frame.eof:  # the previous frame ended: the next one needs a new decompressor
                    self._frame = zstandard.ZstdDecompressor().decompressobj()
                try:
                    out = self._frame.decompress(data)
                except zstandard.ZstdError as exc:
                    raise ImagePrepError(f"corrupt zstd data: {exc}") from None
                data = memoryview(self._frame.unused_data) if self._frame.eof else b""
                if out:
                    yield out


def check_free_space(directory: Path, min_free: int, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free - needed < min_free:
        raise ImagePrepError(
            f"not enough free disk in {directory}: {free // 2**20} MiB free, {needed // 2**20} MiB needed "
            f"plus {min_free // 2**20} MiB reserve"
        )


# --- sources ------------------------------------------------------------------------------


@dataclass
class _Response:
    status: int
    length: int | None
    etag: str | None
    last_modified: str | None
    chunks: AsyncIterator[bytes] | None = None
    close: Callable[[], None] = field(default=lambda: None)


async def _open_http(session: aiohttp.ClientSession, url: str, meta: ImageMeta | None, refresh: bool) -> _Response:
    headers = {}
    if refresh and meta is not None and meta.source == url:
        if meta.etag:
            headers["If-None-Match"] = meta.etag
        if meta.last_modified:
            headers["If-Modified-Since"] = meta.last_modified
    try:
        response = await session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120))
    except aiohttp.ClientError as exc:
        raise ImagePrepError(f"cannot fetch {url}: {exc}") from None
    if response.status == 304:
        response.release()
        return _Response(304, None, meta.etag if meta else None, meta.last_modified if meta else None)
    if response.status >= 400:
        response.release()
        raise ImagePrepError(f"fetching {url} failed: HTTP {response.status} {response.reason}")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ImagePrepError(f"download of {url} broke off: {exc or type(exc).__name__}") from None
        if response.content_length is not None and response.content.total_bytes != response.content_length:
            raise ImagePrepError(
                f"download of {url} broke off after {response.content.total_bytes} of {response.content_length} bytes"
            )

    return _Response(
        response.status, response.content_length, response.headers.get("ETag"), response.headers.get("Last-Modified"),
        chunks(), response.release,
    )


def _open_file(url: str) -> _Response:
    path = Path(unquote(urlparse(url).path))
    try:
        handle = path.open("rb")
    except OSError as exc:
        raise ImagePrepError(f"cannot read {url}: {exc.strerror}") from None
    stat = os.fstat(handle.fileno())

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                yield chunk
        finally:
            handle.close()

    modified = datetime.fromtimestamp(stat.st_mtime, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    return _Response(200, stat.st_size, None, modified, chunks(), handle.close)


# --- the preparer --------------------------------------------------------------------------


async def detect_format(path: Path) -> ImageFormat:
    process = await asyncio.create_subprocess_exec(
        "qemu-img", "info", "--output=json", str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise ImagePrepError(f"qemu-img cannot read the downloaded image: {stderr.decode().strip()}")
    detected = json.loads(stdout)["format"]
    try:
        return ImageFormat(detected)
    except ValueError:
        raise ImagePrepError(f"the downloaded image is {detected}, not qcow2 or raw") from None


class ImagePreparer:
    def __init__(
        self,
        image_map: ImageMap,
        *,
        image_dir: Path,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        on_progress: ProgressCallback | None = None,
        on_wait: Callable[[str, Path], None] | None = None,
    ) -> None:
        self._image_map = image_map
        self.image_dir = image_dir
        self.max_image_bytes = max_image_bytes
        self.min_free_bytes = min_free_bytes
        self._on_progress = on_progress
        self._on_wait = on_wait
        self._locks: dict[str, asyncio.Lock] = {}
        self._status: dict[str, ImageStatus] = {}
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def status(self) -> dict[str, ImageStatus]:
        return dict(self._status)

    def is_ready(self, label: str) -> bool:
        return self._image_map.images[label].local_path.exists()

    async def ensure(self, label: str) -> Path:
        """The image's path once it is there. A ready image returns at once (the file
        at local_path is only ever complete); otherwise wait for its preparation."""
        image = self._image_map.images[label]
        lock = self._locks.get(label)
        if image.local_path.exists() and (lock is None or not lock.locked()):
            return image.local_path
        await self.prepare(label)
        return image.local_path

    async def prepare(self, label: str, *, refresh: bool = False) -> Outcome:
        image = self._image_map.images[label]
        lock = self._locks.setdefault(label, asyncio.Lock())
        async with lock:
            if image.local_path.exists() and not refresh:
                self._status[label] = ImageStatus(label, PrepState.READY)
                return Outcome.PRESENT
            if image.source is None:
                raise ImagePrepError(f"image {label!r}: {image.local_path} does not exist and the image map gives no source")
            self._check_destination(label, image)
            image.local_path.parent.mkdir(parents=True, exist_ok=True)
            file_lock = filelock.FileLock(str(image.local_path) + ".lock", thread_local=False)
            try:
                await asyncio.to_thread(file_lock.acquire, timeout=0)
            except filelock.Timeout:
                log.info("image.waiting", label=label, lock=file_lock.lock_file, reason="another process is preparing it")
                if self._on_wait is not None:
                    self._on_wait(label, Path(file_lock.lock_file))
                await asyncio.to_thread(file_lock.acquire)
            try:
                # Another process may have finished it while we waited for the lock.
                if image.local_path.exists() and not refresh:
                    self._status[label] = ImageStatus(label, PrepState.READY)
                    return Outcome.PRESENT
                status = ImageStatus(label, PrepState.PREPARING, started_at=time.monotonic())
                self._status[label] = status
                try:
                    outcome = await self._fetch(label, image, status, refresh)
                except ImagePrepError as exc:
                    status.state, status.error = PrepState.FAILED, str(exc)
                    log.error("image.failed", label=label, error=str(exc))
                    raise ImagePrepError(f"image {label!r} could not be prepared: {exc}") from None
                status.state = PrepState.READY
                return outcome
            finally:
                await asyncio.to_thread(file_lock.release)

    def _check_destination(self, label: str, image: ImageEntry) -> None:
        assert image.source is not None
        scheme = urlparse(image.source).scheme
        if scheme not in ("http", "https", "file"):
            raise ImagePrepError(f"image {label!r}: unsupported URL scheme {scheme!r} in source (use http, https or file)")
        target = image.local_path.resolve()
        if not target.is_relative_to(self.image_dir.resolve()):
            raise ImagePrepError(f"image {label!r}: local_path {image.local_path} is outside image_dir {self.image_dir}")

    async def _open(self, url: str, meta: ImageMeta | None, refresh: bool) -> _Response:
        if url.startswith("file://"):
            return _open_file(url)
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return await _open_http(self._session, url, meta, refresh)

    async def _fetch(self, label: str, image: ImageEntry, status: ImageStatus, refresh: bool) -> Outcome:
        assert image.source is not None
        target = image.local_path
        old_meta = ImageMeta.read(target) if target.exists() else None
        response = await self._open(image.source, old_meta, refresh)
        if response.status == 304:
            log.info("image.unchanged", label=label, source=image.source, reason="not modified")
            return Outcome.UNCHANGED
        status.bytes_total = response.length
        check_free_space(target.parent, self.min_free_bytes, response.length or 0)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        sink = _Sink(partial, zstd=image.decompress is Decompress.ZSTD, max_bytes=self.max_image_bytes,
                     min_free=self.min_free_bytes, status=status)
        log.info("image.fetching", label=label, source=image.source, bytes=response.length)
        writer = asyncio.create_task(asyncio.to_thread(sink.run))
        try:
            await self._pump(response, sink, writer, status)
            result = await writer
            if image.sha256 and result.sha256 != image.sha256.lower():
                raise ImagePrepError(f"sha256 mismatch: the image map says {image.sha256.lower()}, the download is {result.sha256}")
            if refresh and old_meta is not None and old_meta.sha256 == result.sha256:
                log.info("image.unchanged", label=label, source=image.source, reason="same sha256")
                return Outcome.UNCHANGED
            detected = await detect_format(partial)
            if image.format is not None and detected is not image.format:
                raise ImagePrepError(f"format mismatch: the image map says {image.format.value}, the file is {detected.value}")
            meta = ImageMeta(
                source=image.source, sha256=result.sha256, size=result.bytes_out, format=detected.value,
                fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
                etag=response.etag, last_modified=response.last_modified,
            )
            await asyncio.to_thread(_install, partial, target, meta)
            log.info("image.ready", label=label, path=str(target), bytes=result.bytes_out, format=detected.value,
                     seconds=round(time.monotonic() - (status.started_at or 0), 2))
            return Outcome.DOWNLOADED
        finally:
            response.close()
            if not writer.done():
                writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)
            partial.unlink(missing_ok=True)

    async def _pump(self, response: _Response, sink: _Sink, writer: asyncio.Task, status: ImageStatus) -> None:
        """Feed downloaded chunks to the writer thread without blocking the loop."""
        assert response.chunks is not None
        loop_put = sink.queue.put_nowait
        reported = -1
        try:
            async for chunk in response.chunks:
                while True:
                    if sink.error is not None or writer.done():  # the writer failed: stop downloading
                        return
                    try:
                        loop_put(chunk)
                        break
                    except queue.Full:
                        await asyncio.sleep(0.002)
                if status.bytes_total:
                    tenth = int(10 * status.bytes_in / status.bytes_total)
                    if tenth != reported:
                        reported = tenth
                        log.info("image.progress", label=status.label, percent=tenth * 10, bytes=status.bytes_in)
                if self._on_progress is not None:
                    self._on_progress(status)
        finally:
            await asyncio.to_thread(sink.queue.put, None)


def _install(partial: Path, target: Path, meta: ImageMeta) -> None:
    os.replace(partial, target)
    meta_file = meta_path(target)
    meta_tmp = meta_file.with_name(meta_file.name + ".tmp")
    meta_tmp.write_text(json.dumps(meta.__dict__, indent=2))
    os.replace(meta_tmp, meta_file)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
