"""Consoles stay under CONSOLE_MAX_BYTES while the guest writes: the first MiB, one
marker line and the newest part are kept, nothing the writer appends during a cut is
lost, and a reader following the file by offset never sees a line twice or a torn one."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from orchestrator.core.consolecap import HEAD_BYTES, cap_console, read_cut_state
from orchestrator.core.messages import JobStatus
from orchestrator.web.joblog import LineFollower
from tests.conftest import wait_for

MIB = 1024 * 1024


def test_cutting_while_a_writer_appends_loses_nothing_of_the_newest_part(tmp_path: Path):
    console = tmp_path / "job.console"
    fd = os.open(console, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    written = 0
    stop = threading.Event()

    def writer() -> None:  # a guest printing as fast as it can, as QEMU appends
        nonlocal written
        while not stop.is_set():
            os.write(fd, f"line {written:09d}\n".encode())
            written += 1

    thread = threading.Thread(target=writer)
    thread.start()
    follower = LineFollower(console)
    seen: list[str] = []
    cuts = 0
    try:
        while cuts < 5:
            cuts += bool(cap_console(console, max_bytes=4 * MIB))
            seen += follower.read_lines()
    finally:
        stop.set()
        thread.join()
    os.write(fd, b"ORCH-RESULT nonce 0\n")
    os.close(fd)
    cap_console(console, max_bytes=4 * MIB)
    seen += follower.finish()
    data = console.read_bytes()
    state = read_cut_state(console)
    assert len(data) <= 4 * MIB and not state.cutting
    assert data[:HEAD_BYTES] == b"".join(f"line {n:09d}\n".encode() for n in range(HEAD_BYTES // 15 + 1))[:HEAD_BYTES]
    assert (
        f"[orchestrator: {state.dropped} bytes of console output cut here".encode()
        in data[HEAD_BYTES : HEAD_BYTES + 4096]
    )
    newest = [
        int(line.split()[1]) for line in data[state.cut_start :].decode().splitlines()[1:] if line.startswith("line ")
    ]
    assert newest == list(range(newest[0], written)), "the newest part is whole"
    assert data.endswith(b"ORCH-RESULT nonce 0\n")
    numbers = [int(line.split()[1]) for line in seen if line.startswith("line ") and len(line) == 14]
    assert numbers == sorted(set(numbers)), "the reader never went back or repeated a line"
    assert seen[-1] == "ORCH-RESULT nonce 0"
    # A cut starts at a block boundary, so the line after the marker (or after the jump a
    # reader makes over a cut) may be the end of a line; every other line is whole.
    torn = [
        i
        for i, line in enumerate(seen)
        if not (line.startswith(("line ", "[orchestrator: ", "ORCH-RESULT")) or line == "")
    ]
    assert all(
        (i > 0 and (seen[i - 1].startswith("[orchestrator: ") or seen[i - 1] == ""))
        or int(seen[i - 1].split()[1]) + 1 < int(seen[i + 1].split()[1])
        for i in torn
    ), [seen[i - 1 : i + 2] for i in torn]
    assert len(numbers) > written // 50, "the reader kept up with most of it"


async def test_a_guest_that_prints_without_end_keeps_a_bounded_log_and_its_result(daemon_factory, broker):
    daemon = await daemon_factory(console_max_bytes=4 * MIB)
    await broker.open()
    job = await broker.submit(runs_on="alpha", env={"NOOP_OUTPUT": "y" * 99, "NOOP_OUTPUT_REPEAT": "500000"})  # 50 MB
    result = await broker.next_result(timeout_s=60)
    assert result.status is JobStatus.SUCCEEDED and result.exit_code == 0, result.summary
    await wait_for(lambda: not daemon.job_running(job.job_id), what="the job to leave the runner")
    console = daemon.console_path(job.job_id)
    assert console.stat().st_size <= 4 * MIB
    assert b"bytes of console output cut here" in console.read_bytes()[HEAD_BYTES : HEAD_BYTES + 4096]
    assert oct(console.stat().st_mode & 0o777) == oct(0o640)


async def test_a_console_replaced_by_a_shorter_one_is_read_from_its_start(tmp_path: Path):
    """virtlogd (libvirt's stdio_handler "logd") rotates console files at 2 MiB: the
    follower must read the new file rather than wait for it to outgrow the old one."""
    from orchestrator.host.console import ConsoleFollower

    console = tmp_path / "job.console"
    console.write_bytes(b"boot noise\n" * 10_000)
    follower = ConsoleFollower(console, max_bytes=4 * MIB)
    await follower.poll()
    console.rename(tmp_path / "job.console.0")
    console.write_bytes(b"ORCH-RESULT nonce 0\n")
    assert (await follower.finish()).endswith("ORCH-RESULT nonce 0\n")
