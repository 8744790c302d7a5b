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

An installed image's identity (source, sha256 of the download, format, decompress) is
recorded beside it in `<local_path>.meta.json`. An image whose identity differs from its
map entry, or that has no record, is stale: no job runs on it, and preparing it fetches
it whole (never "has it changed?", which a server would answer for the old file).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import json
import os
import queue
import shutil
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, BinaryIO, Literal
from urllib.parse import unquote, urlparse

import aiohttp
import filelock
import zstandard
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from hypervisors.base import ImageFormat
from orchestrator.core.imagemap import Decompress, ImageEntry, ImageMap
from orchestrator.core.logsetup import EventLogger
from orchestrator.core.metrics import DaemonMetrics, PrepOutcome

log = EventLogger("orchestrator.core.images")

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
    """Where an image stands against its map entry."""

    READY = "ready"  # installed, and what its map entry describes
    MISSING = "missing"  # nothing at local_path
    STALE = "stale"  # a file, but not the one the map entry describes
    PREPARING = "preparing"  # a preparation is under way in this process
    FAILED = "failed"  # the last preparation failed, or the image cannot be used at all


@dataclass(frozen=True)
class ImageState:
    """An image against its map entry. `str()` is the long form, for errors and logs:
    `stale (sha256 changed: the map pins 1a2b…, the installed image is 9f8e…)`;
    `summary` the short one, for listings: `stale (sha256 changed)`."""

    state: PrepState
    reason: str = ""  # stale: what changed; failed: the cause
    detail: str = ""  # stale: the same with the values that differ

    @property
    def ready(self) -> bool:
        return self.state is PrepState.READY

    @property
    def summary(self) -> str:
        return self._text(self.reason)

    def __str__(self) -> str:
        return self._text(self.detail or self.reason)

    def _text(self, why: str) -> str:
        if not why:
            return self.state.value
        return f"stale ({why})" if self.state is PrepState.STALE else f"{self.state.value}: {why}"


@dataclass
class ImageStatus:
    """A preparation's progress in this process (what the progress bar and `/status` show)."""

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


MAX_META_BYTES = 64 * 1024
FILE_MODE = 0o640  # images and their records: the process umask may only make them tighter


class ImageMeta(BaseModel):
    """The sidecar `<local_path>.meta.json`: the installed image's identity (where it was
    fetched from, the sha256 of the download, its format, how it was decompressed) and
    what a conditional refresh needs. An image with a source and no valid sidecar has no
    known identity, so it is stale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    source: str
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
    format: ImageFormat
    decompress: Decompress
    size: Annotated[int, Field(ge=0)]
    fetched_at: datetime
    etag: str | None = None
    last_modified: str | None = None

    @classmethod
    def read(cls, image: Path) -> ImageMeta | None:
        """The record of the image at `image`; None when there is none or it is unreadable,
        oversized or does not validate (all mean: no record)."""
        try:
            text = _read_regular_file(meta_path(image), MAX_META_BYTES + 1)
        except OSError:
            return None
        if text is None or len(text) > MAX_META_BYTES:
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None

    def write(self, image: Path) -> None:
        """Write the record of the image at `image` (0640, replaced atomically)."""
        record = meta_path(image)
        tmp = record.with_name(record.name + ".tmp")
        with _create_private(tmp) as out:
            out.write(self.model_dump_json(indent=2).encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, record)


def meta_path(image: Path) -> Path:
    return image.with_name(image.name + ".meta.json")


def _read_regular_file(path: Path, limit: int) -> bytes | None:
    """Up to `limit` bytes of the regular file at `path`; None when it is something else.
    A symlink is refused (ELOOP) and a FIFO cannot block: image_dir may hold things
    nobody here put there."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return handle.read(limit)


def _create_private(path: Path) -> BinaryIO:
    """A new file at `path`, mode 0640 whatever the umask, never through a symlink. A
    leftover (a crash's) is replaced."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "wb")


def resolve_image_path(image: ImageEntry, *, image_dir: Path) -> Path:
    """`local_path` with every symlink resolved, or `ImagePrepError` when that lies outside
    `image_dir`: a symlink there must not lead a job, a listing or a write to a file
    elsewhere (resolving first, then checking, is what makes the check mean anything)."""
    resolved = image.local_path.resolve()
    if resolved.is_relative_to(image_dir.resolve()):
        return resolved
    where = f"resolves to {resolved}, outside" if resolved != image.local_path else "is outside"
    raise ImagePrepError(f"local_path {image.local_path} {where} image_dir {image_dir}")


ProgressCallback = Callable[[ImageStatus], None]


# --- identity ------------------------------------------------------------------------------


def check_image(image: ImageEntry, *, image_dir: Path) -> ImageState:
    """What is installed for `image`, against the entry: READY, MISSING, STALE (with what
    changed) or FAILED (the file cannot be used). Cheap enough to call per request: a
    stat and a small read. An image without a source (an operator-provided file) has no
    identity to check: it is ready when the file exists. A local_path that resolves
    outside `image_dir` is FAILED, whatever is there."""
    try:
        path = resolve_image_path(image, image_dir=image_dir)
        info = path.stat()
    except ImagePrepError as exc:
        return ImageState(PrepState.FAILED, str(exc))
    except FileNotFoundError:
        return ImageState(PrepState.MISSING)
    except OSError as exc:
        return ImageState(PrepState.FAILED, f"cannot read {image.local_path}: {exc.strerror}")
    if not stat.S_ISREG(info.st_mode):
        return ImageState(PrepState.FAILED, f"{image.local_path} is not a regular file")
    size = info.st_size
    if image.source is None:
        return ImageState(PrepState.READY)
    meta = ImageMeta.read(path)
    if meta is None:
        return ImageState(PrepState.STALE, "no record of where it came from")
    changes = _identity_changes(image, meta, size)
    if not changes:
        return ImageState(PrepState.READY)
    return ImageState(
        PrepState.STALE, ", ".join(what for what, _ in changes), "; ".join(f"{what}: {why}" for what, why in changes)
    )


def _identity_changes(image: ImageEntry, meta: ImageMeta, size: int) -> list[tuple[str, str]]:
    changes = []
    if meta.source != image.source:
        changes.append(("source changed", f"the map says {image.source}, the installed image came from {meta.source}"))
    # A map entry without sha256 pins no hash, and format is compared only when stated.
    if image.sha256 is not None and image.sha256.lower() != meta.sha256:
        changes.append(("sha256 changed", f"the map pins {image.sha256.lower()}, the installed image is {meta.sha256}"))
    if image.format is not None and image.format is not meta.format:
        changes.append(
            ("format changed", f"the map says {image.format.value}, the installed image is {meta.format.value}")
        )
    if image.decompress is not meta.decompress:
        changes.append(
            (
                "decompress changed",
                f"the map says {image.decompress.value}, the installed image was fetched with {meta.decompress.value}",
            )
        )
    if size != meta.size:  # replaced by hand since it was recorded
        changes.append(("file changed", f"it is {size} bytes, its record says {meta.size}"))
    return changes


def describe_image(label: str, image: ImageEntry, *, image_dir: Path, state: ImageState | None = None) -> str:
    """One `orchestrator images list` line: label, state, path, size, format, sha256,
    source and fetch time. `state` defaults to `check_image`; a daemon passes
    `ImagePreparer.state(label)`, which also knows preparations under way."""
    state = state or check_image(image, image_dir=image_dir)
    return f"{label}: {state.summary} {image.local_path} {describe_installed(image, image_dir=image_dir)}"


def describe_installed(image: ImageEntry, *, image_dir: Path) -> str:
    """What is at `image`'s local_path: size, format, sha256, source and fetch time, `-`
    (or `?` for the format) for what is not known."""
    meta, size = None, "-"
    try:
        resolved = resolve_image_path(image, image_dir=image_dir)
        meta = ImageMeta.read(resolved) if image.source is not None else None
        size = f"{resolved.stat().st_size / 2**20:.0f} MiB"
    except (ImagePrepError, OSError):
        pass  # refused or missing: the state says which
    image_format = meta.format.value if meta else image.format.value if image.format else "?"
    return (
        f"{size} format={image_format} sha256={meta.sha256 if meta else '-'} "
        f"source={image.source or '-'} fetched={meta.fetched_at.isoformat() if meta else '-'}"
    )


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
            with _create_private(self.target) as out:
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


async def _open_http(session: aiohttp.ClientSession, url: str, installed: ImageMeta | None) -> _Response:
    """GET `url`; conditionally (If-None-Match / If-Modified-Since) only when `installed`,
    the record of a ready image from this very source, is given."""
    headers = {}
    if installed is not None:
        if installed.etag:
            headers["If-None-Match"] = installed.etag
        if installed.last_modified:
            headers["If-Modified-Since"] = installed.last_modified
    try:
        response = await session.get(
            url, headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=120)
        )
    except aiohttp.ClientError as exc:
        raise ImagePrepError(f"cannot fetch {url}: {exc}") from None
    if response.status == 304:
        response.release()
        if installed is None:
            raise ImagePrepError(
                f"fetching {url} failed: HTTP 304 Not Modified to a request that asked for the whole file"
            )
        return _Response(304, None, installed.etag, installed.last_modified)
    if response.status >= 400:
        response.release()
        raise ImagePrepError(f"fetching {url} failed: HTTP {response.status} {response.reason}")

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in response.content.iter_chunked(CHUNK):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise ImagePrepError(f"download of {url} broke off: {exc or type(exc).__name__}") from None
        if response.content_length is not None and response.content.total_bytes != response.content_length:
            raise ImagePrepError(
                f"download of {url} broke off after {response.content.total_bytes} of {response.content_length} bytes"
            )

    return _Response(
        response.status,
        response.content_length,
        response.headers.get("ETag"),
        response.headers.get("Last-Modified"),
        chunks(),
        response.release,
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
    """Prepares the images of one image map: what jobs wait on (`ensure`), what
    `orchestrator images prepare` runs (`prepare`) and what `/status` and listings show
    (`state`). The map can be swapped at run time (`update_map`)."""

    def __init__(
        self,
        image_map: ImageMap,
        *,
        image_dir: Path,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        min_free_bytes: int = DEFAULT_MIN_FREE_BYTES,
        on_progress: ProgressCallback | None = None,
        on_wait: Callable[[str, Path], None] | None = None,
        metrics: DaemonMetrics | None = None,
    ) -> None:
        self._image_map = image_map
        self.image_dir = image_dir
        self.max_image_bytes = max_image_bytes
        self.min_free_bytes = min_free_bytes
        self._on_progress = on_progress
        self._on_wait = on_wait
        self._metrics = metrics
        self._locks: dict[str, asyncio.Lock] = {}
        self._status: dict[str, ImageStatus] = {}
        self._session: aiohttp.ClientSession | None = None
        self._show_in_metrics()

    def _show_in_metrics(self) -> None:
        if self._metrics is not None:
            for label, image in self._image_map.images.items():
                if image.source is not None:
                    self._metrics.image_known(label)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def update_map(self, image_map: ImageMap) -> None:
        """Use `image_map` from now on. Preparations under way finish with the entry they
        started with; every check after this call uses the new entries, so an image whose
        entry changed is stale at once. A failure recorded for an entry that changed is
        forgotten: it said nothing about the new one."""
        old, self._image_map = self._image_map, image_map
        self._show_in_metrics()
        for label, status in list(self._status.items()):
            if status.state is not PrepState.PREPARING and image_map.images.get(label) != old.images.get(label):
                del self._status[label]

    def status(self) -> dict[str, ImageStatus]:
        """Progress of the preparations this process ran or runs, by label."""
        return dict(self._status)

    def state(self, label: str) -> ImageState:
        """Where `label`'s image stands, synchronously and cheaply (a stat and a small
        read): PREPARING while a preparation of it runs here; FAILED when the last one
        failed and nothing is installed; otherwise `check_image` against the current map
        (a stale image whose preparation failed stays STALE; `status()` has the error)."""
        progress = self._status.get(label)
        if progress is not None and progress.state is PrepState.PREPARING:
            return ImageState(PrepState.PREPARING)
        found = check_image(self._image_map.images[label], image_dir=self.image_dir)
        if found.state is PrepState.MISSING and progress is not None and progress.state is PrepState.FAILED:
            return ImageState(PrepState.FAILED, progress.error or "")
        return found

    def needs_preparation(self, label: str) -> bool:
        """True for an image with a source that is missing, stale or failed: what a daemon
        prepares in the background at start-up and after a map reload."""
        return self._image_map.images[label].source is not None and self.state(label).state in (
            PrepState.MISSING,
            PrepState.STALE,
            PrepState.FAILED,
        )

    async def ensure(self, label: str) -> Path:
        """The image's path once the installed image is what the map entry describes. A
        ready image returns at once (the file at local_path is only ever complete, even
        while a refresh of it runs); a missing or stale one is prepared first. Raises
        `ImagePrepError` naming the mismatch and the cause: a job never runs on an image
        the map does not describe."""
        image = self._entry(label)
        while True:
            found = check_image(image, image_dir=self.image_dir)
            if found.ready:
                return resolve_image_path(image, image_dir=self.image_dir)
            await self._prepare(label, image, refresh=False)
            current = self._entry(label)
            if current == image:
                found = check_image(image, image_dir=self.image_dir)
                if found.ready:
                    return resolve_image_path(image, image_dir=self.image_dir)
                raise ImagePrepError(f"image {label!r} is {found} right after its preparation")
            image = current  # the map changed while we prepared: prepare for the new entry

    async def prepare(self, label: str, *, refresh: bool = False) -> Outcome:
        """Make the installed image what the map entry describes. A ready image is PRESENT
        (nothing asked) unless `refresh`: then the source is asked conditionally and the
        image replaced only if it changed (UNCHANGED or DOWNLOADED). A missing or stale
        image is fetched whole, never conditionally, and verified (DOWNLOADED)."""
        return await self._prepare(label, self._entry(label), refresh=refresh)

    def _entry(self, label: str) -> ImageEntry:
        try:
            return self._image_map.images[label]
        except KeyError:
            raise ImagePrepError(f"image {label!r} is not in the image map") from None

    async def _prepare(self, label: str, image: ImageEntry, *, refresh: bool) -> Outcome:
        lock = self._locks.setdefault(label, asyncio.Lock())
        async with lock:
            found = check_image(image, image_dir=self.image_dir)
            if found.ready and (not refresh or image.source is None):
                self._status[label] = ImageStatus(label, PrepState.READY)
                return Outcome.PRESENT
            started, progress = time.monotonic(), ImageStatus(label, PrepState.PREPARING)
            try:
                if image.source is None:
                    raise ImagePrepError(
                        found.reason or f"{image.local_path} does not exist and the image map gives no source"
                    )
                outcome = await self._prepare_locked(label, image, refresh=refresh, status=progress)
            except (ImagePrepError, OSError) as exc:
                cause = (
                    str(exc)
                    if isinstance(exc, ImagePrepError)
                    else f"{exc.filename or 'image file'}: {exc.strerror or exc}"
                )
                self._status[label] = ImageStatus(label, PrepState.FAILED, error=cause)
                log.error("image.failed", label=label, error=cause)
                self._observe(label, PrepOutcome.FAILED, started, progress)
                what = f"is {found} and " if found.state is PrepState.STALE else ""
                raise ImagePrepError(f"image {label!r} {what}could not be prepared: {cause}") from None
            if outcome is not Outcome.PRESENT:  # PRESENT here: another process prepared it meanwhile
                self._observe(label, PrepOutcome(outcome.value), started, progress)
            return outcome

    def _observe(self, label: str, outcome: PrepOutcome, started: float, progress: ImageStatus) -> None:
        """One preparation in the metrics: from taking the image's lock to its outcome
        (a wait for another process's file lock included), and the bytes it wrote."""
        if self._metrics is not None:
            self._metrics.image_prepared(
                label=label,
                outcome=outcome,
                seconds=time.monotonic() - started,
                bytes_written=progress.bytes_out,
            )

    async def _prepare_locked(self, label: str, image: ImageEntry, *, refresh: bool, status: ImageStatus) -> Outcome:
        """The part under the file lock, which other processes (the CLI, a second daemon)
        respect too. `status` becomes the preparation's progress once a fetch begins."""
        _check_scheme(image)
        target = resolve_image_path(image, image_dir=self.image_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        lock_path = target.with_name(target.name + ".lock")
        if lock_path.is_symlink():  # older filelock releases open it without O_NOFOLLOW
            raise ImagePrepError(f"{lock_path} is a symlink; remove it")
        file_lock = filelock.FileLock(str(lock_path), thread_local=False)
        try:
            await asyncio.to_thread(file_lock.acquire, timeout=0)
        except filelock.Timeout:
            log.info("image.waiting", label=label, lock=file_lock.lock_file, reason="another process is preparing it")
            if self._on_wait is not None:
                self._on_wait(label, Path(file_lock.lock_file))
            await asyncio.to_thread(file_lock.acquire)
        try:
            # Another process may have prepared it while we waited for the lock.
            found = check_image(image, image_dir=self.image_dir)
            if found.ready and not refresh:
                self._status[label] = ImageStatus(label, PrepState.READY)
                return Outcome.PRESENT
            status.started_at = time.monotonic()
            self._status[label] = status
            # Only a ready image may be asked "has it changed?": for any other, an answer
            # of "not modified" would keep an image the map does not describe.
            installed = ImageMeta.read(target) if found.ready else None
            try:
                outcome = await self._fetch(label, image, target, status, installed)
            except BaseException:
                # Not preparing any more; the caller records a failure, a cancellation
                # leaves the image's state to what is on disk.
                self._status.pop(label, None)
                raise
            status.state = PrepState.READY
            return outcome
        finally:
            await asyncio.to_thread(file_lock.release)

    async def _open(self, url: str, installed: ImageMeta | None) -> _Response:
        if url.startswith("file://"):
            return _open_file(url)
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False)
        return await _open_http(self._session, url, installed)

    async def _fetch(
        self, label: str, image: ImageEntry, target: Path, status: ImageStatus, installed: ImageMeta | None
    ) -> Outcome:
        """Download, verify and install at `target` (local_path resolved). `installed` is the
        record of a ready image (a refresh): it allows a conditional request, and an
        identical download is UNCHANGED."""
        assert image.source is not None
        response = await self._open(image.source, installed)
        if response.status == 304:
            log.info("image.unchanged", label=label, source=image.source, reason="not modified")
            return Outcome.UNCHANGED
        status.bytes_total = response.length
        check_free_space(target.parent, self.min_free_bytes, response.length or 0)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        sink = _Sink(
            partial,
            zstd=image.decompress is Decompress.ZSTD,
            max_bytes=self.max_image_bytes,
            min_free=self.min_free_bytes,
            status=status,
        )
        log.info(
            "image.fetching", label=label, source=image.source, bytes=response.length, conditional=installed is not None
        )
        writer = asyncio.create_task(asyncio.to_thread(sink.run))
        try:
            await self._pump(response, sink, writer, status)
            result = await writer
            if image.sha256 and result.sha256 != image.sha256.lower():
                raise ImagePrepError(
                    f"sha256 mismatch: the image map says {image.sha256.lower()}, the download is {result.sha256}"
                )
            if installed is not None and installed.sha256 == result.sha256:
                log.info("image.unchanged", label=label, source=image.source, reason="same sha256")
                return Outcome.UNCHANGED
            detected = await detect_format(partial)
            if image.format is not None and detected is not image.format:
                raise ImagePrepError(
                    f"format mismatch: the image map says {image.format.value}, the file is {detected.value}"
                )
            meta = ImageMeta(
                source=image.source,
                sha256=result.sha256,
                format=detected,
                decompress=image.decompress,
                size=result.bytes_out,
                fetched_at=datetime.now(UTC).replace(microsecond=0),
                etag=response.etag,
                last_modified=response.last_modified,
            )
            await asyncio.to_thread(_install, partial, target, meta)
            log.info(
                "image.ready",
                label=label,
                path=str(target),
                bytes=result.bytes_out,
                format=detected.value,
                seconds=round(time.monotonic() - (status.started_at or 0), 2),
            )
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


def _check_scheme(image: ImageEntry) -> None:
    assert image.source is not None
    scheme = urlparse(image.source).scheme
    if scheme not in ("http", "https", "file"):
        raise ImagePrepError(f"unsupported URL scheme {scheme!r} in source (use http, https or file)")


def _install(partial: Path, target: Path, meta: ImageMeta) -> None:
    """Put the verified image and its record in place. The old record goes first, so a
    crash in between leaves an image without a record (stale, fetched again), never a
    record that describes another file."""
    meta_path(target).unlink(missing_ok=True)
    os.replace(partial, target)
    meta.write(target)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
