"""Hostile guests and clients, measured from outside a daemon: a 1 GiB log served whole
at constant memory, a fast printer followed live without losing a line, a console cut
and a SIGKILL that still leave the job its result, files that stay private whatever the
umask, and a log stream cut mid-batch that resumes without repeating a line."""

from __future__ import annotations

import asyncio
import os
import random
import stat
import time
from pathlib import Path

import aiohttp

from orchestrator.core.consolecap import HEAD_BYTES, read_cut_state, state_path
from orchestrator.core.messages import JobStatus
from orchestrator.host.runner import StopReason
from orchestrator.web.joblog import CHUNK_BYTES
from orchestrator.web.logstream import SSE_POLL_S
from tests.conftest import wait_for
from tests.host.test_reliability import daemon_env
from tests.support.daemonproc import DaemonProcess
from tests.support.procstat import GIB, PeakUse, peak_rss_bytes, reset_peak_rss, rss_bytes, with_limits
from tests.support.rawhttp import metric, scrape
from tests.web.test_httpapi import free_port

FD_LIMIT = 1024
MB = 1_000_000
MIB = 1024 * 1024


def tracebacks(daemon: DaemonProcess) -> list[str]:
    return [line for line in daemon.lines if "Traceback" in line]


# --- a 1 GiB log ---------------------------------------------------------------------

LOG_BYTES = GIB
# What a guest's serial port writes: CRLF line ends and a progress bar redrawn with a bare CR.
BODY = b"".join(b"%08d a console line of a job that prints a lot, as a guest would\r\n" % i for i in range(10_000))
BODY += b"progress 50%\rprogress 100%\r\n"


def _block_header(number: int) -> bytes:
    # Every block differs (a repeated or skipped one shows), and so does its length, so
    # some CRLFs straddle the server's read chunks.
    return b"block %08d %s\r\n" % (number, b"~" * (number % 7))


def _as_text(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")


def _append_blocks(console: Path, blocks: int) -> None:
    with console.open("ab") as out:
        for number in range(blocks):
            out.write(_block_header(number) + BODY)


def _crlf_split_at_a_chunk_boundary(console: Path) -> int:
    """How many of the server's read chunks end between a CR and its LF."""
    count = 0
    with console.open("rb") as raw:
        for boundary in range(CHUNK_BYTES, console.stat().st_size, CHUNK_BYTES):
            raw.seek(boundary - 1)
            count += raw.read(2) == b"\r\n"
    return count


class ExpectedText:
    """The text the daemon must serve, produced as the download goes, so a 1 GiB
    response is compared byte for byte without holding either side whole."""

    def __init__(self, first: bytes, blocks: int) -> None:
        self._pending = bytearray(first)
        self._blocks = iter(range(blocks))
        self._body = _as_text(BODY)
        self.compared = 0

    def matches(self, chunk: bytes) -> bool:
        while len(self._pending) < len(chunk):
            number = next(self._blocks, None)
            if number is None:
                return False  # more received than there is
            self._pending += _as_text(_block_header(number)) + self._body
        same = self._pending[: len(chunk)] == chunk
        del self._pending[: len(chunk)]
        self.compared += len(chunk)
        return same

    def exhausted(self) -> bool:
        return not self._pending and next(self._blocks, None) is None


async def test_a_1_gib_log_is_served_whole_with_lf_line_ends_for_under_50_mb_of_daemon_memory(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    port = free_port()
    state = tmp_path / "state"
    env = daemon_env(prefix, state, noop_map_path, ORCH_BACKEND="noop", HTTP_LISTEN=f"127.0.0.1:{port}")
    # 3 GiB of address space: a daemon that held the log whole (and its LF copy) could not run.
    limits = with_limits(nofile=(FD_LIMIT, FD_LIMIT), address_space=3 * GIB)
    daemon = await DaemonProcess(env, preexec_fn=limits).start()
    assert daemon.process is not None
    pid = daemon.process.pid
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "the job begins"})
    result = await broker.next_result(timeout_s=30)
    assert result.status is JobStatus.SUCCEEDED, result.summary
    console = state / "logs" / f"{job.job_id}.console"
    try:
        first = console.read_bytes()  # the job's own output, its result line last
        blocks = -(-LOG_BYTES // (len(_block_header(0)) + len(BODY)))
        await asyncio.to_thread(_append_blocks, console, blocks)  # the finished job's log grew to 1 GiB
        raw_size = console.stat().st_size
        assert raw_size >= LOG_BYTES
        assert await asyncio.to_thread(_crlf_split_at_a_chunk_boundary, console) > 0, (
            "no CRLF across a read: a weaker test"
        )
        expected = ExpectedText(_as_text(first), blocks)
        text_size = raw_size - (first.count(b"\r\n") + blocks * (BODY.count(b"\r\n") + 1))

        before = rss_bytes(pid)
        reset_peak_rss(pid)
        sampled = PeakUse(pid, interval_s=0.05)
        received, mismatch_at = 0, None
        url = f"http://127.0.0.1:{port}/jobs/{job.job_id}/log"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http, http.get(url) as response:
            assert response.status == 200 and response.content_length == text_size
            async for chunk in response.content.iter_chunked(MIB):
                if mismatch_at is None and not expected.matches(chunk):
                    mismatch_at = received
                received += len(chunk)
        peak = max((await sampled.stop()).rss_bytes, peak_rss_bytes(pid))
        assert mismatch_at is None, f"the text differs from the console's from byte {mismatch_at} on"
        assert received == text_size and expected.exhausted(), (received, text_size)
        assert peak - before < 50 * MB, (
            f"serving the log grew the daemon from {before / MB:.0f} MB to {peak / MB:.0f} MB"
        )
    finally:
        console.unlink(missing_ok=True)  # 1 GiB that pytest would otherwise keep in its tmp dirs
    assert not tracebacks(daemon), tracebacks(daemon)[:3]
    assert await daemon.stop() == 0


# --- a fast printer followed live ---------------------------------------------------

PRINTED_LINES = 200_000


def _numbered_console(count: int) -> bytes:
    # Lines of 8 to 57 bytes, CRLF-ended as a serial port writes them.
    return b"".join(b"%d %s\r\n" % (n, b"x" * (n % 50)) for n in range(count))


def _print_like_a_guest(console: Path, output: bytes, seed: int) -> None:
    """Append `output` as a guest's console arrives: in writes of 1 to 300 bytes (ending
    inside lines, and between a CR and its LF) at full speed, with a 1 ms breath every
    4 KiB so that the daemon reads while the guest prints, and two stops longer than the
    daemon's poll, one inside a line and one between a CR and its LF."""
    pieces = random.Random(seed)
    third = len(output) // 3
    stops = [output.index(b" ", third) + 1, output.index(b"\r", 2 * third) + 1]
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
    try:
        at = breath = 0
        while at < len(output):
            end = at + pieces.randint(1, 300)
            if stops and end >= stops[0]:
                end = stops.pop(0)
                os.write(fd, output[at:end])
                time.sleep(SSE_POLL_S + 0.3)
            else:
                os.write(fd, output[at:end])
            at = end
            if at >= breath:
                time.sleep(0.001)
                breath = at + 4096
    finally:
        os.close(fd)


async def _follow(url: str) -> tuple[list[str], list[int], bool]:
    """Follow a log stream from its start to its end: its data lines, its ids, and
    whether it ended with the `end` event."""
    data, ids, ended = [], [], False
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        event: list[str] = []
        while raw := await response.content.readline():
            line = raw.decode().removesuffix("\n")
            if line:
                event.append(line)
                continue
            if event == ["event: end", "data: "]:
                ended = True
            else:
                for field in event:
                    name, _, value = field.partition(": ")
                    if name == "data":
                        data.append(value)
                    elif name == "id":
                        ids.append(int(value))
                    else:
                        raise AssertionError(f"unexpected field in an event: {field!r}")
            event = []
    return data, ids, ended


async def test_a_fast_printer_loses_no_line_on_the_live_log_stream(daemon_factory, broker):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_FAIL": "hang"})  # a VM that prints nothing by itself
    await wait_for(lambda: daemon.job_running(job.job_id), what="the job to be running")
    console = daemon.console_path(job.job_id)
    assert not console.exists()
    follower = asyncio.create_task(_follow(f"http://127.0.0.1:{port}/jobs/{job.job_id}/log/stream"))
    await wait_for(lambda: _streams_served(port, 1), what="the stream to be served")  # following from the very start
    output = _numbered_console(PRINTED_LINES)
    await asyncio.to_thread(_print_like_a_guest, console, output, seed=PRINTED_LINES)
    assert len(output) < daemon.settings.console_max_bytes  # nothing is cut: every line must arrive
    assert daemon.runner.stop_job(job.job_id, StopReason.CANCEL)
    assert (await broker.next_result(timeout_s=30)).status is JobStatus.CANCELLED
    data, ids, ended = await asyncio.wait_for(follower, 60)
    assert ended, "the stream ends with its end event"
    numbers = [_number(line) for line in data]
    assert numbers == list(range(PRINTED_LINES)), _first_difference(numbers)
    assert data == [f"{n} {'x' * (n % 50)}" for n in range(PRINTED_LINES)], "every line whole, without a CR"
    assert ids == sorted(set(ids)) and ids[-1] == console.stat().st_size == len(output)
    assert len(ids) >= 10, f"{len(ids)} batches: the daemon did not read while the guest printed"


async def _streams_served(port: int, count: int) -> bool:
    return metric(await scrape(port), "orchestrator_http_streams") == count


def _number(line: str) -> int | str:
    """The number a line starts with; the line itself when it is not one (a torn line)."""
    first = line.split(" ")[0]
    return int(first) if first.isdigit() else line


def _first_difference(numbers: list[int | str]) -> str:
    for at, number in enumerate(numbers):
        if number != at:
            return f"line {at} is number {number}; around it: {numbers[max(0, at - 3) : at + 3]}"
    return f"{len(numbers)} lines of {PRINTED_LINES}"


# --- a console cut, then SIGKILL ----------------------------------------------------

CONSOLE_MAX_BYTES = 4 * MIB


def _console_settled_under_the_cap(console: Path) -> bool:
    cut = read_cut_state(console)
    return state_path(console).exists() and not cut.cutting and console.stat().st_size <= CONSOLE_MAX_BYTES


async def test_the_result_is_found_after_a_console_cut_and_a_sigkill(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    """The second attempt's output starts far into a console that has been cut, and is
    cut itself to below where it started: its result line must still be read."""
    state = tmp_path / "state"
    env = daemon_env(prefix, state, noop_map_path, ORCH_BACKEND="noop", CONSOLE_MAX_BYTES=str(CONSOLE_MAX_BYTES))
    first = await DaemonProcess(env).start()
    await broker.open()
    # 60 MB of output, then 4 s more of running: each run is cut several times.
    job = await broker.submit(
        runs_on="alpha",
        env={
            "NOOP_OUTPUT": "y" * 99,
            "NOOP_OUTPUT_REPEAT": "600000",
            "NOOP_DURATION_S": "4",
        },
    )
    console = state / "logs" / f"{job.job_id}.console"
    await wait_for(lambda: _console_settled_under_the_cap(console), timeout_s=30, what="the console cut below the cap")
    await first.kill()
    # A VM outlives its daemon and goes on printing (libvirt's do): up to just under the cap.
    with console.open("ab") as out:
        out.write(b"printed while the daemon was down\n" * ((CONSOLE_MAX_BYTES - console.stat().st_size) // 34 - 1))
    second = await DaemonProcess(env).start()  # the same STATE_DIR: its journal has the job as running
    result = await broker.next_result(timeout_s=60)
    assert str(result.request_id) == job.job_id
    # A noop VM dies with its daemon: the job is handed back and run again.
    assert (result.status, result.exit_code, result.attempt) == (JobStatus.SUCCEEDED, 0, 2), result.summary
    cut = read_cut_state(console)
    data = console.read_bytes()
    assert len(data) <= CONSOLE_MAX_BYTES and not cut.cutting, (len(data), cut)
    # The head kept is the first attempt's: its start line, then its output.
    started, printed = data[:HEAD_BYTES].split(b"\n", 1)
    assert started.startswith(b"ORCH-STARTED ")
    assert printed == ((b"y" * 99 + b"\n") * (HEAD_BYTES // 100 + 1))[: len(printed)]
    assert f"[orchestrator: {cut.dropped} bytes of console output cut here".encode() in data[cut.head : cut.cut_start]
    assert data.endswith(b" 0\n") and data.rsplit(b"\n", 2)[-2].startswith(b"ORCH-RESULT ")
    assert not tracebacks(second), tracebacks(second)[:3]
    assert await second.stop() == 0
    assert broker.results.empty() and not broker.conflicts


# --- permissions whatever the umask ---------------------------------------------------


def _no_umask() -> None:
    os.umask(0)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_state_dir_and_console_are_private_under_umask_0(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    state = tmp_path / "state"  # made by the daemon
    env = daemon_env(prefix, state, noop_map_path, ORCH_BACKEND="noop")
    daemon = await DaemonProcess(env, preexec_fn=_no_umask).start()
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "TOKEN=secret"})
    assert (await broker.next_result(timeout_s=30)).status is JobStatus.SUCCEEDED
    assert await daemon.stop() == 0
    assert oct(_mode(state)) == oct(0o750)
    console = state / "logs" / f"{job.job_id}.console"
    assert _mode(console) & ~0o640 == 0, f"console is {oct(_mode(console))}"


async def test_nothing_under_state_dir_is_group_writable_or_open_to_others_under_umask_0(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    """A group member who can write in logs/ could plant a symlink where a console will
    be opened; one who can write state.db could add jobs. Cut sidecars included."""
    state = tmp_path / "state"
    env = daemon_env(prefix, state, noop_map_path, ORCH_BACKEND="noop", CONSOLE_MAX_BYTES=str(CONSOLE_MAX_BYTES))
    daemon = await DaemonProcess(env, preexec_fn=_no_umask).start()
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "y" * 99, "NOOP_OUTPUT_REPEAT": "100000"})
    assert (await broker.next_result(timeout_s=30)).status is JobStatus.SUCCEEDED
    assert state_path(state / "logs" / f"{job.job_id}.console").exists(), "the console was cut"
    open_paths = {
        str(path.relative_to(state)): oct(_mode(path)) for path in [state, *state.rglob("*")] if _mode(path) & 0o027
    }
    assert await daemon.stop() == 0
    assert not open_paths, f"group-writable or open to others: {open_paths}"


def test_a_seed_iso_written_under_umask_0_is_private(tmp_path):
    from hypervisors.base import SeedFiles
    from hypervisors.seed import read_seed_iso, write_seed_iso

    seed = SeedFiles(user_data=b"#!/bin/sh\nexport TOKEN='secret'\n", meta_data=b"instance-id: job\n")
    iso = tmp_path / "seeds" / "job-x.iso"
    previous = os.umask(0)
    try:
        write_seed_iso(seed, iso)
    finally:
        os.umask(previous)
    assert _mode(iso) & ~0o640 == 0, f"the seed is {oct(_mode(iso))}"
    assert read_seed_iso(iso)["user-data"] == seed.user_data
    assert [p.name for p in iso.parent.iterdir()] == ["job-x.iso"]  # no .partial left


# --- a stream cut mid-batch ---------------------------------------------------------


def _dispatched(received: bytes) -> tuple[list[str], str]:
    """What an EventSource (HTML, "interpreting an event stream") did with `received`:
    the data of each complete event it dispatched, and its last event ID, which an
    event without an `id:` field does not change."""
    lines, last_id = [], ""
    complete, _, _ = received.rpartition(b"\n\n")
    for event in complete.decode().split("\n\n"):
        fields = [field.partition(": ") for field in event.split("\n")]
        for name, _, value in fields:
            if name == "id":
                last_id = value
        if all(name != "event" for name, _, _ in fields):  # a message: one console line
            lines += [value for name, _, value in fields if name == "data"]
    return lines, last_id


async def test_a_client_cut_mid_batch_resumes_without_a_line_twice(daemon_factory, tmp_path):
    port = free_port()
    daemon = await daemon_factory(http_listen=f"127.0.0.1:{port}")
    job_id = "5a1f0c3e-8d2b-4c6a-9e7f-0b1c2d3e4f50"  # a finished job's log: no broker needed
    lines = [f"line {n}" for n in range(PRINTED_LINES)]
    daemon.console_path(job_id).write_bytes("".join(f"{line}\r\n" for line in lines).encode())
    url = f"http://127.0.0.1:{port}/jobs/{job_id}/log/stream"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            received = await response.content.readexactly(200_000)  # then the network fails
            response.close()
        seen, last_id = _dispatched(received)
        assert seen, "the client saw some lines before the cut"
        async with http.get(url, headers={"Last-Event-ID": last_id} if last_id else {}) as response:
            rest, _ = _dispatched(await response.read())
    shown = seen + rest
    assert len(shown) == len(set(shown)), (
        f"{len(shown) - len(set(shown))} lines shown twice, from {shown[len(seen)]!r} on"
    )
    assert shown == lines
