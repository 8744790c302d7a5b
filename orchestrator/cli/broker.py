"""The CLI's side of the broker: open an exchange the daemons declared, and ask every
host a question over the control exchange."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from orchestrator.cli.common import CLIError
from orchestrator.config import DaemonSettings
from orchestrator.messages import ControlMessage


@contextlib.asynccontextmanager
async def broker_exchange(settings: DaemonSettings, name: str) -> AsyncIterator[tuple[Any, Any]]:
    """A confirm channel and an exchange the daemons declared; CLIError when either the
    broker or the exchange is not there."""
    import aio_pika

    try:
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    except Exception as exc:  # noqa: BLE001 - refused, DNS, TLS, auth, timeout, bad URL: each is the user's to fix
        raise CLIError(f"cannot connect to the broker at {settings.masked_amqp_url()}: {exc}") from None
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        try:
            exchange = await channel.get_exchange(name, ensure=True)
        except aio_pika.exceptions.ChannelClosed:
            raise CLIError(
                f"exchange {name} does not exist: no orchestrator daemon with prefix {settings.amqp_prefix!r} has started on this broker yet"
            ) from None
        yield channel, exchange


async def ask_hosts(settings: DaemonSettings, question: ControlMessage, answer_timeout: float) -> list[bytes]:
    """Publish a control message to every host with a reply queue; the bodies of the
    answers that arrived within `answer_timeout` seconds."""
    from orchestrator.amqp import json_message
    from orchestrator.topology import Topology

    message = json_message(question, persistent=False)
    async with broker_exchange(settings, Topology(settings.amqp_prefix).control) as (channel, control):
        replies_queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        message.reply_to = replies_queue.name
        await control.publish(message, routing_key="")
        bodies: list[bytes] = []
        try:
            async with asyncio.timeout(answer_timeout):
                async with replies_queue.iterator() as incoming:
                    async for reply in incoming:
                        async with reply.process():
                            bodies.append(reply.body)
        except TimeoutError:
            pass
    return bodies
