"""The zones backend against fake zonecfg/zoneadm/zfs (illumos commands cannot run
here; they are the only fakes): a guest runs the real user-data from the seed ISO."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypervisors.base import BackendError, ImageFormat, SeedFiles, VmSpec, VmState
from hypervisors.guest import (
    build_meta_data,
    build_user_data,
    find_exit_code,
    new_nonce,
)
from hypervisors.zones import ZonesHypervisor, ZoneTools
from tests.support.fakes.illumos_bin import install_fake_illumos_tools


@pytest.fixture
def zones(tmp_path, monkeypatch) -> Iterator[ZonesHypervisor]:
    bin_dir, fake_env = install_fake_illumos_tools(tmp_path)
    for name, value in fake_env.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "state" / "seeds").mkdir(parents=True)
    # A short zonepath: the console socket's path must fit AF_UNIX's 108 bytes, as
    # /zones/job-<uuid>/root/tmp/vm.com1 does on a real host.
    zonepath_root = Path(tempfile.mkdtemp(prefix="z", dir="/tmp"))
    yield ZonesHypervisor(
        state_dir=tmp_path / "state",
        orchestrator_id="orch-z",
        dataset="tank/orch",
        zonepath_root=zonepath_root,
        tools=ZoneTools(bin_dir),
        zvol_devices=tmp_path / "dev",
    )
    shutil.rmtree(zonepath_root)


def fake_state(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "illumos.json").read_text())


def job_spec(tmp_path: Path, script: str, image_format=ImageFormat.RAW) -> VmSpec:
    image = tmp_path / "oi.img"
    image.write_bytes(b"raw disk image" * 100)
    job = str(uuid.uuid4())
    nonce = new_nonce()
    user_data = build_user_data(
        job_id=job,
        nonce=nonce,
        env={"WHO": "zone"},
        repo_url=None,
        commit_sha=None,
        checkout=False,
        script=script,
        script_path=None,
    )
    return VmSpec(
        name=f"job-{job}",
        job_id=job,
        image_path=image,
        image_format=image_format,
        cpus=2,
        memory_mb=2048,
        disk_gb=20,
        console_path=tmp_path / "logs" / f"{job}.console",
        seed=SeedFiles(user_data, build_meta_data(job_id=job, hostname="z")),
        nonce=nonce,
    )


async def test_zone_runs_the_job_and_leaves_nothing(zones, tmp_path):
    spec = job_spec(tmp_path, "echo hello from $WHO; exit 4")
    await zones.prepare(spec)
    config = fake_state(tmp_path)["zones"][spec.name]
    assert config["attrs"]["vcpus"] == "2" and config["attrs"]["ram"] == "2048M"
    assert config["attrs"]["bootdisk"] == f"tank/orch/vms/{spec.name}"
    assert config["attrs"]["orch-job-id"] == spec.job_id
    assert "tank/orch/images/oi@base" in fake_state(tmp_path)["datasets"]
    await zones.start(spec)
    assert [vm.job_id for vm in await zones.list_ours()] == [spec.job_id]
    assert await zones.wait_stopped(spec) is VmState.STOPPED
    console = spec.console_path.read_text()
    assert "hello from zone" in console and find_exit_code(console, spec.nonce) == 4
    await zones.destroy(spec)
    state = fake_state(tmp_path)
    assert state["zones"] == {}
    assert f"tank/orch/vms/{spec.name}" not in state["datasets"]
    assert not (tmp_path / "state" / "seeds" / f"{spec.name}.iso").exists()


async def test_hung_guest_is_halted_and_removed(zones, tmp_path):
    spec = job_spec(tmp_path, "while true; do sleep 1; done")
    await zones.prepare(spec)
    await zones.start(spec)
    await zones.shutdown(spec, timeout_s=0.5)
    assert fake_state(tmp_path)["zones"] == {}
    assert await zones.list_ours() == []


async def test_zones_without_our_tag_are_not_ours(zones, tmp_path):
    spec = job_spec(tmp_path, "true")
    await zones.prepare(spec)
    other = ZonesHypervisor(
        state_dir=tmp_path / "state",
        orchestrator_id="someone-else",
        dataset="tank/orch",
        zonepath_root=zones._zonepath_root,
        tools=zones._tools,
        zvol_devices=tmp_path / "dev",
    )
    assert await other.list_ours() == []
    assert [vm.name for vm in await zones.list_ours()] == [spec.name]
    await zones.destroy(spec)


async def test_leftovers_are_clones_without_a_zone_and_files_of_jobs_not_live(zones, tmp_path):
    live, crashed = job_spec(tmp_path, "true"), job_spec(tmp_path, "true")
    await zones.prepare(live)
    await zones.prepare(crashed)
    await asyncio.to_thread(
        subprocess.run, [str(zones._tools._bin_dir / "zonecfg"), "-z", crashed.name, "delete", "-F"], check=True
    )
    operator_file = tmp_path / "state" / "seeds" / "operator-notes.iso"
    operator_file.write_text("keep")
    removed = await zones.leftovers({live.name})
    datasets = fake_state(tmp_path)["datasets"]
    assert f"tank/orch/vms/{crashed.name}" not in datasets and f"tank/orch/vms/{live.name}" in datasets
    assert f"tank/orch/vms/{crashed.name}" in removed
    assert not (tmp_path / "state" / "seeds" / f"{crashed.name}.iso").exists()
    assert (tmp_path / "state" / "seeds" / f"{live.name}.iso").exists() and operator_file.exists()
    await zones.destroy(live)


async def test_qcow2_images_are_refused_for_bhyve(zones, tmp_path):
    with pytest.raises(BackendError, match="bhyve zones boot raw images"):
        await zones.prepare(job_spec(tmp_path, "true", ImageFormat.QCOW2))


def test_zonecfg_values_are_quoted_and_quotes_refused(zones, tmp_path):
    spec = job_spec(tmp_path, "true")
    script = zones._zonecfg_script(spec)
    assert 'set value="2048M"' in script and "create -b" in script and script.endswith("commit\n")
    bad = VmSpec(**{**spec.__dict__, "console_path": Path('/x/"; delete -F')})
    with pytest.raises(BackendError, match="refusing to pass"):
        zones._zonecfg_script(bad)
