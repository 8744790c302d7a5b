"""Hostile job request bodies reach the DLQ with a reason their publisher can act on, and
the daemon (a child process with bounded memory and descriptors) keeps serving."""

from __future__ import annotations

import asyncio
import json
import resource
import uuid

from orchestrator.core.messages import MAX_SCRIPT_BYTES, JobStatus
from orchestrator.core.topology import REASON_HEADER
from tests.conftest import SHA, Broker
from tests.host.test_reliability import daemon_env
from tests.support.daemonproc import DaemonProcess

MESSAGE_LIMIT = 1024 * 1024  # admits the script below (768 KiB as UTF-8), not the padding
LIMITS = {resource.RLIMIT_AS: 4 * 1024**3, resource.RLIMIT_NOFILE: 256}


def _request(**fields: object) -> bytes:
    valid = {"request_id": str(uuid.uuid4()), "repo_url": "https://example.invalid/repo.git", "commit_sha": SHA}
    return json.dumps({**valid, **fields}, ensure_ascii=False).encode()


def _hostile_bodies() -> dict[str, tuple[bytes, str]]:
    """name -> (body, the start of its reason)"""
    too_large = _request(padding="x" * MESSAGE_LIMIT)
    return {
        "deadline": (
            _request(deadline="9999-12-31T23:59:59-14:00"),
            "invalid job request: deadline: out of range: 9999-12-31T23:59:59-14:00 is outside",
        ),
        "nesting": (b"[" * 100_000, "JSON nested too deeply"),
        "number": (
            _request(timeout_s=0).replace(b'"timeout_s": 0', b'"timeout_s": ' + b"7" * 5000),
            "number too long: timeout_s has 5000 digits",
        ),
        "size": (
            too_large,
            f"message is {len(too_large)} bytes, over the limit of {MESSAGE_LIMIT} bytes (MAX_MESSAGE_BYTES)",
        ),
        "script": (
            _request(script="\u20ac" * MAX_SCRIPT_BYTES),
            f"invalid job request: script: is {3 * MAX_SCRIPT_BYTES} bytes as UTF-8, over the limit of {MAX_SCRIPT_BYTES} bytes",
        ),
        "array": (b'[{"request_id": "x"}]', "not a JSON object but a JSON array"),
        "utf8": (b'{"request_id": "\xff\xfe"}', "not UTF-8 text: byte 0xff at offset 16 is invalid"),
    }


async def _reasons_in_dlq(broker: Broker, count: int, timeout_s: float) -> dict[bytes, str]:
    """Body -> reason of up to `count` dead letters: what arrived by `timeout_s`, so a
    failure shows which bodies were refused how (and which not at all)."""
    got: dict[bytes, str] = {}
    channel = await broker.connection.channel()
    queue = await channel.get_queue(broker.topology.dlq, ensure=False)
    try:
        async with asyncio.timeout(timeout_s), queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                got[message.body] = str(message.headers.get(REASON_HEADER))
                if len(got) == count:
                    break
    except TimeoutError:
        pass
    await channel.close()
    return got


async def test_hostile_bodies_go_to_the_dlq_with_their_reasons_and_the_daemon_keeps_serving(
    prefix, tmp_path, noop_map_path, cleanup_topology, broker
):
    env = daemon_env(
        prefix, tmp_path / "state", noop_map_path, ORCH_BACKEND="noop", MAX_MESSAGE_BYTES=str(MESSAGE_LIMIT)
    )
    daemon = await DaemonProcess(env, limits=LIMITS).start()
    await broker.open()
    hostile = _hostile_bodies()
    for body, _ in hostile.values():
        await broker.publish_raw(body, "alpha")
    # The unroutable queue (a legacy routing key) refuses with the same reasons.
    legacy = _request(runs_on="alpha", deadline="9999-12-31T23:59:59-14:00")
    hostile["legacy deadline"] = (legacy, hostile["deadline"][1])
    await broker.publish_raw(legacy, "jobrequest.v1")

    reasons = await _reasons_in_dlq(broker, len(hostile), timeout_s=30)
    got = {name: reasons.get(body, "(not dead-lettered)")[: len(reason)] for name, (body, reason) in hostile.items()}
    assert got == {name: reason for name, (_, reason) in hostile.items()}

    request = await broker.submit(runs_on="alpha")
    result = await broker.next_result(timeout_s=30)
    assert result.request_id == request.request_id and result.status is JobStatus.SUCCEEDED
    assert await daemon.stop() == 0
