"""A delivery's channel lost while it is handled (a broker node going down): aio-pika
cancels the consumer's callback, but a job the intake journaled meanwhile must still
reach the runner (else it stays `accepted`, never run, its capacity held), the handler
sees the channel closed (`delivery_channel_open`, which the intake checks before it
journals), and the broker keeps every message that was not acked. The connection is
cut for real, by a TCP proxy between the consumer and the broker."""

from __future__ import annotations

import asyncio

import aio_pika

from orchestrator.core.amqp import ConfirmedPublisher, connect
from orchestrator.core.topology import Topology
from orchestrator.host.consumer import Decision, QueueConsumer, Settler, Verdict, delivery_channel_open
from orchestrator.host.window import Claimed
from tests.conftest import wait_for


async def test_a_delivery_journaled_as_its_channel_goes_still_reaches_the_runner_and_the_broker_keeps_the_messages(
    amqp_proxy, amqp, prefix
):
    queue_name = f"{prefix}.consumer-loss"
    setup = await amqp.channel()
    await setup.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    connection = await connect(amqp_proxy.url, name="consumer-loss-test")
    try:
        handling = asyncio.Event()
        go_on = asyncio.Event()
        started: list[str] = []
        channel_open_after_cut: list[bool] = []

        async def handler(message: aio_pika.abc.AbstractIncomingMessage, _claimed: Claimed) -> Decision:
            handling.set()
            await go_on.wait()  # the channel is cut meanwhile
            channel_open_after_cut.append(delivery_channel_open(message))
            body = message.body.decode()
            return Decision(Verdict.START, job_id=body, after_ack=lambda: started.append(body))

        settler = Settler(await ConfirmedPublisher.open(connection), Topology(prefix))
        consumer = await QueueConsumer.open(
            connection, queue_name, handler, settler, prefetch=1
        )  # one delivery at a time
        for body in ("journaled", "not journaled"):
            await setup.default_exchange.publish(aio_pika.Message(body.encode()), routing_key=queue_name)
        await consumer.resume()

        await asyncio.wait_for(handling.wait(), 20)
        amqp_proxy.down()  # aio-pika cancels the callback now
        await wait_for(lambda: not connection.connected.is_set(), what="the connection to drop")
        go_on.set()
        await wait_for(lambda: started == ["journaled"], what="the journaled delivery to reach the runner")
        assert channel_open_after_cut == [False]

        # Nothing was acked over the cut connection: the broker has both messages back,
        # for any consumer (the intake's journal recognises a job it already started).
        await connection.close()
        assert sorted(await _take_all(setup, queue_name, 2)) == [b"journaled", b"not journaled"]
        assert started == ["journaled"]
    finally:
        await connection.close()
        await setup.queue_delete(queue_name)
        await setup.close()


async def _take_all(channel: aio_pika.abc.AbstractChannel, queue_name: str, count: int) -> list[bytes]:
    """Up to `count` messages from the queue, as another host's consumer would get them
    (waiting for the broker to have requeued what the cut connection held)."""
    queue = await channel.get_queue(queue_name, ensure=False)
    bodies: list[bytes] = []
    async with asyncio.timeout(30):
        async with queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                bodies.append(message.body)
                if len(bodies) == count:
                    break
    return bodies
