"""Start-up: only the backends some image uses are built, and every start-up failure is
one `error: <what> (<fix>)` line with a non-zero exit, no traceback, and nothing left
open. Each case runs the real daemon as a subprocess."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.core.imagemap import load_image_map
from orchestrator.core.lifecycle import StartupError
from orchestrator.host.daemon import Daemon
from tests.conftest import AMQP_URL, make_settings, wait_for
from tests.support.daemonproc import ROOT, DaemonProcess
from tests.support.fakes.illumos_bin import install_fake_illumos_tools

UNREACHABLE_LIBVIRT = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"


def env_for(prefix: str, tmp_path: Path, config: Path, **extra: str) -> dict[str, str]:
    return {
        "AMQP_URL": AMQP_URL,
        "AMQP_PREFIX": prefix,
        "ORCH_CONFIG": str(config),
        "STATE_DIR": str(tmp_path / "state"),
        "IMAGE_DIR": str(tmp_path),
        "HOST_NAME": "h",
        "HTTP_LISTEN": "off",
        "BROKER_CONNECT_TIMEOUT_S": "2",
        **extra,
    }


async def run_until_exit(env: dict[str, str], timeout_s: float = 60) -> tuple[int, list[str]]:
    """Run `orchestrator run` to its exit; its return code and stderr lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "orchestrator",
        "run",
        env={**os.environ, "LOG_FORMAT": "json", **env},
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return process.returncode, stderr.decode().splitlines()


def assert_one_line_error(code: int, lines: list[str], *fragments: str) -> str:
    """Exit 1, no traceback, and the last stderr line is the one `error:` line."""
    assert code == 1, lines
    assert not any("Traceback" in line for line in lines), lines
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == [lines[-1]], lines
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert errors[0].rstrip().endswith(")"), "the line ends with how to fix it"
    return errors[0]


def write_map(tmp_path: Path, backend: str, **image: str) -> Path:
    extra = "".join(f", {k}: {v}" for k, v in image.items())
    (tmp_path / "a.img").write_bytes(b"\0" * 4096)
    path = tmp_path / f"{backend}-map.yaml"
    path.write_text(f"default_label: a\nimages:\n  a: {{backend: {backend}, local_path: {tmp_path}/a.img{extra}}}\n")
    return path


def libvirt_map(tmp_path: Path) -> Path:
    path = tmp_path / "libvirt-map.yaml"
    image = tmp_path / "a.qcow2"
    image.write_bytes(b"")
    path.write_text(f"default_label: a\nimages:\n  a: {{local_path: {image}, format: qcow2}}\n")
    return path


async def test_noop_only_map_starts_without_libvirt(prefix, tmp_path, cleanup_topology):
    cleanup_topology.append("a")
    env = env_for(
        prefix, tmp_path, write_map(tmp_path, "noop"), ORCH_BACKEND="libvirt", LIBVIRT_URI=UNREACHABLE_LIBVIRT
    )
    daemon = await DaemonProcess(env).start()
    assert await daemon.stop() == 0
    started = next(line for line in daemon.lines if '"daemon.started"' in line)
    assert '"backends": ["noop"]' in started


async def test_zones_only_map_starts_with_libvirt_not_importable(prefix, tmp_path, cleanup_topology):
    cleanup_topology.append("a")
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "libvirt.py").write_text("raise ImportError('libvirt-python is not installed (test shadow)')\n")
    bin_dir, fake_env = install_fake_illumos_tools(tmp_path)
    env = env_for(
        prefix,
        tmp_path,
        write_map(tmp_path, "zones", format="raw"),
        ORCH_BACKEND="libvirt",
        PYTHONPATH=str(shadow),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        **fake_env,
    )
    daemon = await DaemonProcess(env).start()
    assert await daemon.stop() == 0
    assert any('"backends": ["zones"]' in line for line in daemon.lines)


async def test_libvirt_image_without_libvirt_python_names_the_extra(prefix, tmp_path):
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "libvirt.py").write_text("raise ImportError('test shadow')\n")
    code, lines = await run_until_exit(env_for(prefix, tmp_path, libvirt_map(tmp_path), PYTHONPATH=str(shadow)))
    assert_one_line_error(code, lines, "images a use the libvirt backend", "pip install '.[libvirt]'")


async def test_unreachable_broker_is_retried_then_one_line(prefix, tmp_path):
    env = env_for(prefix, tmp_path, write_map(tmp_path, "noop"), AMQP_URL="amqp://guest:secret@127.0.0.1:1/")
    code, lines = await run_until_exit(env)
    error = assert_one_line_error(
        code,
        lines,
        "cannot connect to the broker at amqp://guest:****@127.0.0.1:1/ within 2 s",
        "BROKER_CONNECT_TIMEOUT_S",
    )
    assert "secret" not in "".join(lines)
    attempts = [line for line in lines if '"broker.connect_failed"' in line]
    assert len(attempts) >= 2, "each failed attempt is logged"
    assert error


async def test_a_broker_that_comes_up_after_the_daemon_is_waited_for(
    prefix, tmp_path, amqp_proxy, broker, cleanup_topology
):
    cleanup_topology.append("a")
    amqp_proxy.down()  # under systemd the broker may start after us
    env = env_for(prefix, tmp_path, write_map(tmp_path, "noop"), AMQP_URL=amqp_proxy.url, BROKER_CONNECT_TIMEOUT_S="60")
    daemon = DaemonProcess(env)
    starting = asyncio.create_task(daemon.start())
    await wait_for(
        lambda: sum('"broker.connect_failed"' in line for line in daemon.lines) >= 2,
        what="two logged connection attempts",
    )
    amqp_proxy.up()
    await starting
    await broker.open()
    job = await broker.submit(runs_on="a")
    assert (await broker.next_result()).request_id == job.request_id
    assert await daemon.stop() == 0


async def test_unusable_state_dir_is_one_line(prefix, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = env_for(prefix, tmp_path, write_map(tmp_path, "noop"), STATE_DIR=str(blocker / "state"))
    assert_one_line_error(*await run_until_exit(env), f"cannot use STATE_DIR {blocker}/state", "set STATE_DIR")


async def test_http_port_in_use_is_one_line(prefix, tmp_path, cleanup_topology):
    cleanup_topology.append("a")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        env = env_for(prefix, tmp_path, write_map(tmp_path, "noop"), HTTP_LISTEN=listen)
        assert_one_line_error(
            *await run_until_exit(env), f"cannot listen on HTTP_LISTEN {listen}", "address already in use"
        )


async def test_an_image_file_outside_image_dir_is_one_line(prefix, tmp_path):
    env = env_for(prefix, tmp_path, libvirt_map(tmp_path), IMAGE_DIR=str(tmp_path / "images"))
    assert_one_line_error(*await run_until_exit(env), "images.a.local_path:", "is outside IMAGE_DIR", "set IMAGE_DIR")


@pytest.mark.libvirt
async def test_libvirtd_unreachable_is_one_line(prefix, tmp_path):
    env = env_for(prefix, tmp_path, libvirt_map(tmp_path), LIBVIRT_URI=UNREACHABLE_LIBVIRT)
    assert_one_line_error(*await run_until_exit(env), "backend libvirt (images a)", "is libvirtd running?")


@pytest.mark.libvirt
async def test_missing_libvirt_network_is_one_line(prefix, tmp_path):
    env = env_for(prefix, tmp_path, libvirt_map(tmp_path), LIBVIRT_NETWORK="no-such-network")
    assert_one_line_error(
        *await run_until_exit(env), "libvirt network 'no-such-network' does not exist", "LIBVIRT_NETWORK=none"
    )


def _broker_connections() -> list[str]:
    listing = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "client_properties"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in listing.splitlines() if "connection_name" in line]


async def test_failed_start_closes_what_it_opened(prefix, tmp_path, noop_map_path, cleanup_topology):
    """In-process, so the test can look from outside while the process lives on: the
    broker connection is gone (the broker's own list) and the journal thread ended."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(
            prefix,
            tmp_path / "state",
            noop_map_path,
            host_name=f"closes-{prefix}",
            http_listen=f"127.0.0.1:{taken.getsockname()[1]}",
        )
        daemon = Daemon(settings, load_image_map(noop_map_path))
        with pytest.raises(StartupError, match="address already in use"):
            await daemon.start()
    ours = f"orchestrator@closes-{prefix}"
    assert not [c for c in await asyncio.to_thread(_broker_connections) if ours in c]
    assert not [t for t in threading.enumerate() if t.name == f"journal:{settings.state.journal}"]
