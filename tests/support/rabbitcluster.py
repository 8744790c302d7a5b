"""The three-node RabbitMQ cluster of `scripts/rabbitmq-cluster.sh`, as tests use it:
its URLs, a node stopped and started, and what its nodes say about queues."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "rabbitmq-cluster.sh"
NODES = (1, 2, 3)
AMQP_PORT_BASE = 5680


def run_script(*args: str, timeout_s: float = 180) -> str:
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise AssertionError(f"rabbitmq-cluster.sh {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout


@dataclass
class RabbitCluster:
    running: set[int]
    start_times: list[float] = field(default_factory=list)  # seconds each start-node took

    @staticmethod
    def url(node: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{AMQP_PORT_BASE + node}/"

    def urls(self, *order: int) -> str:
        """AMQP_URL listing the nodes in `order` (default 1, 2, 3), then the others."""
        first = list(order) + [n for n in NODES if n not in order]
        return ",".join(self.url(n) for n in first)

    @staticmethod
    def node_number(node: str) -> int:
        """1-3 from `host:port` (as logs and /readyz name it) or `orch-cN@localhost`."""
        if node.startswith("orch-c"):
            return int(node[len("orch-c") :].split("@")[0])
        return int(node.rpartition(":")[2]) - AMQP_PORT_BASE

    async def stop_node(self, node: int) -> None:
        await asyncio.to_thread(run_script, "stop-node", str(node))
        self.running.discard(node)

    async def start_node(self, node: int) -> None:
        began = time.monotonic()
        await asyncio.to_thread(run_script, "start-node", str(node))
        self.running.add(node)
        self.start_times.append(round(time.monotonic() - began, 1))

    async def ctl(self, *args: str) -> str:
        """rabbitmqctl on a running node, asked again on the next one (then after a
        pause) when one does not answer: with twenty hosts and three nodes on two cores,
        a node may be too busy for the CLI's own timeout."""
        for attempt in range(6):
            node = sorted(self.running)[attempt % len(self.running)]
            try:
                return await asyncio.to_thread(run_script, "ctl", str(node), "-q", *args)
            except AssertionError:
                if attempt == 5:
                    raise
                await asyncio.sleep(1)
        raise AssertionError("unreachable")

    async def queues(self, prefix: str) -> dict[str, dict[str, Any]]:
        """The queues named `<prefix>.*`: name -> leader, members, ready and unacked counts."""
        text = await self.ctl(
            "list_queues",
            "name",
            "leader",
            "members",
            "messages_ready",
            "messages_unacknowledged",
            "--formatter",
            "json",
        )
        return {q["name"]: q for q in json.loads(text) if q["name"].startswith(f"{prefix}.")}

    async def dead_letter_reasons(self, prefix: str) -> list[str]:
        """What the dead-letter queue holds: each message's reason, routing key and body."""
        connection = await aio_pika.connect(self.url(sorted(self.running)[0]))
        try:
            channel = await connection.channel()
            queue = await channel.get_queue(f"{prefix}.jobs.dlq", ensure=False)
            found = []
            while (message := await queue.get(no_ack=False, fail=False)) is not None:
                headers = message.headers or {}
                found.append(
                    f"{headers.get('x-orchestrator-reason') or headers.get('x-death')} "
                    f"(key {message.routing_key}): {message.body[:300]!r}"
                )
            return found
        finally:
            await connection.close()

    async def leader_of(self, queue: str) -> int:
        text = await self.ctl("list_queues", "name", "leader", "--formatter", "json")
        leader = next(q["leader"] for q in json.loads(text) if q["name"] == queue)
        return self.node_number(leader)

    async def assert_nothing_left(self, prefix: str, timeout_s: float = 20) -> None:
        """No message of the test's queues is ready or unacked anywhere in the cluster.
        A quorum queue's counts are the leader's statistics, refreshed every few seconds:
        asked again until they hold or `timeout_s` passes."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = {
                name: (q["messages_ready"], q["messages_unacknowledged"])
                for name, q in (await self.queues(prefix)).items()
                if q["messages_ready"] or q["messages_unacknowledged"]
            }
            if not left:
                return
            if time.monotonic() >= deadline:
                dead = await self.dead_letter_reasons(prefix) if left.get(f"{prefix}.jobs.dlq", (0, 0))[0] else []
                raise AssertionError(
                    f"left in the broker (ready, unacked) after {timeout_s:g} s: {left}; dead letters: {dead}"
                )
            await asyncio.sleep(1)
