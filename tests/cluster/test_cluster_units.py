"""Several broker nodes in AMQP_URL, without a cluster: each URL is checked, every
password is masked, and the failover connection still has aio-pika's hook."""

from __future__ import annotations

import socket

import aio_pika
import pytest

from orchestrator.core.amqp import FailoverConnection, connect, node_of
from orchestrator.core.config import SettingsError, load_settings
from tests.conftest import AMQP_URL


def test_amqp_url_takes_a_comma_separated_list_of_nodes():
    settings = load_settings({"amqp_url": "amqp://u:s3cret@h1:5681/, amqps://v:pw%2C2@h2:5682/vh"}, environ={})
    assert settings.amqp_urls == ["amqp://u:s3cret@h1:5681/", "amqps://v:pw%2C2@h2:5682/vh"]
    assert settings.masked_amqp_url() == "amqp://u:****@h1:5681/,amqps://v:****@h2:5682/vh"


@pytest.mark.parametrize(
    "bad, says",
    [
        ("amqp://u:s3cret@h1/,http://h2/", "URL 2 of 2 (http://h2/) must start with amqp://"),
        ("amqp://u:s3cret@h1:99999/", "Port out of range"),
        ("amqp:///", "names no host"),
        (" , ", "no broker URL given"),
    ],
)
def test_a_bad_node_url_is_named_and_no_password_is_shown(bad, says):
    with pytest.raises(SettingsError) as refused:
        load_settings({"amqp_url": bad}, environ={})
    assert says in str(refused.value) and "s3cret" not in str(refused.value)


def test_quorum_size_is_a_setting():
    assert load_settings({}, environ={}).quorum_size == 3
    assert load_settings({}, environ={"QUORUM_SIZE": "5"}).quorum_size == 5
    with pytest.raises(SettingsError, match="QUORUM_SIZE"):
        load_settings({}, environ={"QUORUM_SIZE": "0"})


def test_the_failover_hook_is_still_in_aio_pika():
    # FailoverConnection overrides the one connection attempt of aio-pika's reconnect loop.
    assert "_RobustConnection__connect_transport" in vars(aio_pika.RobustConnection)
    assert "_RobustConnection__connect_transport" in vars(FailoverConnection)


def test_node_of_names_host_and_port_only():
    assert node_of("amqp://u:s3cret@10.0.0.1:5681/vh") == "10.0.0.1:5681"
    assert node_of("amqp://u:s3cret@broker/") == "broker:5672"


async def test_a_dead_node_first_in_the_list_is_skipped():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"amqp://guest:guest@127.0.0.1:{probe.getsockname()[1]}/"
    connection = await connect(f"{dead},{AMQP_URL}", name="test")
    try:
        assert connection.node == node_of(AMQP_URL)
    finally:
        await connection.close()
    assert connection.node is None
