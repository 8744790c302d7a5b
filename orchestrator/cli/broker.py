"""The CLI's side of the broker: open an exchange the daemons declared, and ask every
host a question over the control exchange.

With several nodes in `AMQP_URL`, a command connects to the first that answers. When
that node is lost while the command works (a publish not yet confirmed, a question
whose answers are still coming), the work is done again from the start on the next node
that answers, once per node, and each switch is said on stderr. Doing it again is safe:
a job request published twice carries the same `message_id`, and a question asked twice
is answered twice by the same hosts (answers are collected per attempt).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from orchestrator.cli.common import CLIError
from orchestrator.core.config import DaemonSettings, mask_password
from orchestrator.core.messages import ControlMessage

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10


class NodeLost(Exception):
    """The node a command worked on went away before the work was done."""


async def _connect_first(urls: list[str], start: int) -> tuple[Any, int]:
    """A connection to the first node that answers, trying them in order from `start`;
    CLIError naming each node's failure when none does."""
    import aio_pika

    from orchestrator.core.amqp import describe_error, node_of

    failures = []
    for offset in range(len(urls)):
        index = (start + offset) % len(urls)
        try:
            return await aio_pika.connect(urls[index], timeout=CONNECT_TIMEOUT_S), index
        except Exception as exc:
            failures.append(
                f"{mask_password(urls[index]) if len(urls) == 1 else node_of(urls[index])}: {describe_error(exc)}"
            )
    if len(urls) == 1:
        raise CLIError(f"cannot connect to the broker at {failures[0]}")
    raise CLIError(f"cannot connect to any broker node ({'; '.join(failures)})")


async def on_any_node(settings: DaemonSettings, exchange_name: str, work: Callable[[Any, Any], Awaitable[T]]) -> T:
    """Run `work(channel, exchange)` on a confirm channel of the first node that answers,
    with `exchange_name` (one the daemons declared) opened on it. When the node is lost
    before `work` returns, run it again from the start on the next node that answers
    (at most once per node); CLIError when every node has been lost, or when the
    exchange does not exist."""
    import aio_pika
    from aio_pika.exceptions import CONNECTION_EXCEPTIONS

    from orchestrator.core.amqp import describe_error, node_of

    urls = settings.amqp_urls
    start = 0
    for _ in urls:
        connection, index = await _connect_first(urls, start)
        start = index + 1
        try:
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                try:
                    exchange = await channel.get_exchange(exchange_name, ensure=True)
                except aio_pika.exceptions.ChannelClosed:
                    raise CLIError(
                        f"exchange {exchange_name} does not exist: no orchestrator daemon with prefix "
                        f"{settings.amqp_prefix!r} has started on this broker yet"
                    ) from None
                return await work(channel, exchange)
        except (NodeLost, *CONNECTION_EXCEPTIONS) as exc:
            if isinstance(exc, aio_pika.exceptions.DeliveryError):
                raise CLIError(f"the broker refused the message ({describe_error(exc)})") from None
            if len(urls) == 1:
                raise CLIError(f"lost the broker at {settings.masked_amqp_url()}: {describe_error(exc)}") from None
            print(f"lost broker node {node_of(urls[index])} ({describe_error(exc)}); trying the next", file=sys.stderr)
    raise CLIError(f"lost every broker node of AMQP_URL ({', '.join(node_of(url) for url in urls)}) in turn")


async def ask_hosts(settings: DaemonSettings, question: ControlMessage, answer_timeout: float) -> list[bytes]:
    """Publish a control message to every host with a reply queue; the bodies of the
    answers that arrived within `answer_timeout` seconds."""
    from orchestrator.core.amqp import json_message
    from orchestrator.core.topology import Topology

    async def ask(channel: Any, control: Any) -> list[bytes]:
        message = json_message(question, persistent=False)
        replies_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        message.reply_to = replies_queue.name
        await control.publish(message, routing_key="")
        bodies: list[bytes] = []
        lost = asyncio.get_running_loop().create_future()

        def on_close(_channel: object, exc: BaseException | None = None) -> None:
            if not lost.done():
                lost.set_result(exc)

        channel.close_callbacks.add(on_close)
        try:
            async with asyncio.timeout(answer_timeout):
                async with replies_queue.iterator() as incoming:
                    async for reply in incoming:
                        async with reply.process():
                            bodies.append(reply.body)
        except TimeoutError:
            pass
        if lost.done() and lost.result() is not None:
            raise NodeLost(str(lost.result()))
        return bodies

    return await on_any_node(settings, Topology(settings.amqp_prefix).control, ask)
