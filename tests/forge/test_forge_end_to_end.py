"""Once for each forge, end to end: a push webhook → the bridge → the real broker → a
noop daemon → commit statuses queued, running and success for the right commit and
context, in the forge's own state names, with the log URL."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.fakeforge import FakeForge
from tests.support.fakeforge import forgejo as fake_forgejo
from tests.support.fakeforge import github as fake_github
from tests.support.fakeforge import gitlab as fake_gitlab
from tests.support.forgebridge import JOBS, SECRET, start_bridge, write_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "forge"


@dataclass(frozen=True)
class ForgeKit:
    kind: str
    install: Callable[[FakeForge], object]
    push: Callable[[str], tuple[dict[str, str], bytes]]  # a signed push of a commit
    repo: str
    states: list[str]  # queued, running, success as the forge names them


def github_push(sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads(fake_github.fixture("push.branch"))
    payload["after"] = sha
    body = json.dumps(payload).encode()
    return fake_github.webhook_headers("push", body, SECRET), body


def forgejo_push(sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads((FIXTURES / "forgejo" / "push_branch.json").read_bytes())
    payload["after"] = sha
    payload["head_commit"]["id"] = sha
    body = json.dumps(payload).encode()
    headers = json.loads((FIXTURES / "forgejo" / "push_branch.headers.json").read_bytes())
    signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {**headers, "X-Forgejo-Signature": signature, "X-Gitea-Signature": signature}, body


def gitlab_push(sha: str) -> tuple[dict[str, str], bytes]:
    payload = json.loads((FIXTURES / "gitlab" / "push.json").read_bytes())
    payload.update(after=sha, checkout_sha=sha)
    headers = json.loads((FIXTURES / "gitlab" / "push.headers.json").read_bytes())
    return {**headers, "X-Gitlab-Token": SECRET}, json.dumps(payload).encode()


def install_gitlab(fake: FakeForge) -> None:
    fake_gitlab.install(fake)
    fake.project_ids["mike/diaspora"] = 15  # the project of the push fixture


KITS = [
    ForgeKit("github", fake_github.install, github_push, "octo-org/widgets", ["pending", "pending", "success"]),
    ForgeKit("forgejo", fake_forgejo.install, forgejo_push, "forgejo/webhooks", ["pending", "pending", "success"]),
    ForgeKit("gitlab", install_gitlab, gitlab_push, "mike/diaspora", ["pending", "running", "success"]),
]


@pytest.mark.parametrize("kit", KITS, ids=[k.kind for k in KITS])
async def test_a_push_shows_queued_running_success_on_the_commit(
    kit, tmp_path, prefix, cleanup_topology, daemon_factory
):
    fake = FakeForge()
    kit.install(fake)
    await fake.start()
    config = write_config(tmp_path, forge=kit.kind, kind=kit.kind, api_url=fake.url, repo=kit.repo)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge=kit.kind)
    try:
        await daemon_factory(public_url="http://hv01.example:9465")
        sha = hashlib.sha1(kit.kind.encode()).hexdigest()
        fake.files[(kit.repo, sha, ".orchestrator.yaml")] = JOBS.encode()
        status, text = await bridge.deliver(*kit.push(sha))
        assert status == 202, text
        assert await fake.wait_for_statuses(sha, "orchestrator/test", 3) == kit.states
        shown = [s for s in fake.statuses if s.sha == sha]
        assert [s.description for s in shown][:2] == ["queued", "running on host0"]
        assert shown[-1].description.startswith("succeeded in ")
        assert shown[-1].target_url is not None and shown[-1].target_url.startswith("http://hv01.example:9465/jobs/")
    finally:
        await bridge.bridge.stop()
        await fake.close()


@pytest.mark.libvirt
async def test_a_push_runs_in_a_real_vm_and_its_status_links_to_the_log(
    tmp_path, prefix, cleanup_topology, test_image, test_network
):
    import aiohttp

    from hypervisors.base import BackendName
    from orchestrator.core.imagemap import load_image_map
    from orchestrator.host.daemon import Daemon
    from tests.conftest import make_settings
    from tests.web.test_httpapi import free_port

    cleanup_topology.extend(["demo", "demo-silent"])
    port = free_port()
    settings = make_settings(
        prefix,
        tmp_path / "state",
        test_image / "image-map.yaml",
        backend=BackendName.LIBVIRT,
        image_dir=test_image,
        libvirt_domain_type="qemu",
        libvirt_network=test_network,
        orchestrator_id=f"test-{prefix}",
        host_cpus=2,
        host_memory_mb=2048,
        http_listen=f"127.0.0.1:{port}",
        public_url=f"http://127.0.0.1:{port}",
    )
    daemon = Daemon(settings, load_image_map(test_image / "image-map.yaml"))
    await daemon.start()
    fake = await fake_github.install(FakeForge()).start()
    config = write_config(tmp_path, forge="github", kind="github", api_url=fake.url, repo="octo-org/widgets")
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge="github")
    try:
        sha = hashlib.sha1(b"real vm").hexdigest()
        jobs = "jobs:\n  test:\n    runs_on: demo\n    script: echo hello from a real VM via the forge bridge\n"
        fake.files[("octo-org/widgets", sha, ".orchestrator.yaml")] = jobs.encode()
        assert (await bridge.deliver(*github_push(sha)))[0] == 202
        states = await fake.wait_for_statuses(sha, "orchestrator/test", 3, timeout_s=240)
        assert states == ["pending", "pending", "success"]
        final = [s for s in fake.statuses if s.sha == sha][-1]
        async with aiohttp.ClientSession() as http:
            async with http.get(final.target_url) as response:
                assert response.status == 200
                assert "hello from a real VM via the forge bridge" in await response.text()
    finally:
        await bridge.bridge.stop()
        await fake.close()
        await daemon.stop()


SIGNATURE_HEADERS = {"github": "X-Hub-Signature-256", "forgejo": "X-Forgejo-Signature", "gitlab": "X-Gitlab-Token"}


@pytest.mark.parametrize("kit", KITS, ids=[k.kind for k in KITS])
async def test_a_signature_that_is_not_utf8_is_just_a_wrong_one(kit, tmp_path, prefix, cleanup_topology):
    import asyncio

    fake = FakeForge()
    kit.install(fake)
    await fake.start()
    config = write_config(tmp_path, forge=kit.kind, kind=kit.kind, api_url=fake.url, repo=kit.repo)
    bridge = await start_bridge(prefix, tmp_path, fake, config, forge=kit.kind)
    try:
        headers, body = kit.push("a" * 40)
        headers = {k: v for k, v in headers.items() if k not in SIGNATURE_HEADERS.values() and "Signature" not in k}
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        request = (
            f"POST /hooks/{kit.kind} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\nConnection: close\r\n".encode()
            + head
            + SIGNATURE_HEADERS[kit.kind].encode()
            + b": \xff\xfe\x80\r\n\r\n"
            + body
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.bridge.port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:120]
    finally:
        await bridge.bridge.stop()
        await fake.close()
