"""Failover between the nodes of a RabbitMQ cluster: the `hosts` and `urls` settings, the order
in which nodes are tried (with a counting fake connection), and a sink that loses the node it
publishes to and moves on to another, against two real, independent RabbitMQ nodes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml

from bridge.core.status import EndpointStatus
from bridge.errors import ConfigError, ConnectorError, ErrorCategory
from bridge.registry import load_config
from protocols.amqp import AmqpSinkConfig, AmqpSourceConfig
from protocols.amqp.connection import AmqpSession


def write(tmp_path: Path, sink: dict[str, Any]) -> Path:
    """A configuration with one AMQP sink and nothing else."""
    path = tmp_path / "config.yaml"
    document = {"bridge": {"id": "edge"},
                "sinks": [{"id": "rabbit", "protocol": "amqp", **sink}]}
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def sink_config(tmp_path: Path, **options: Any) -> AmqpSinkConfig:
    """One loaded AMQP sink."""
    (sink,) = load_config(write(tmp_path, options)).sinks
    assert isinstance(sink, AmqpSinkConfig)
    return sink


# --- configuration ---------------------------------------------------------------------------

def test_hosts_share_port_credentials_and_virtual_host(tmp_path: Path) -> None:
    config = sink_config(tmp_path, hosts=["rabbit-1", "rabbit-2:5673", "[::1]:5674"],
                         port=5700, username="bridge", password="s3cret",
                         virtual_host="/plant")
    nodes = config.addresses()
    assert [node.node for node in nodes] == ["rabbit-1:5700", "rabbit-2:5673", "[::1]:5674"]
    assert {(node.username, node.password, node.virtual_host, node.tls) for node in nodes} == {
        ("bridge", "s3cret", "/plant", False)}
    assert config.endpoint() == ("amqp://bridge@rabbit-1:5700,rabbit-2:5673,[::1]:5674/"
                                 "%2Fplant?exchange=fieldbridge.events")
    assert "s3cret" not in repr(config)


def test_urls_give_each_node_and_hide_passwords(tmp_path: Path) -> None:
    config = sink_config(tmp_path, urls=["amqp://u:pw@rabbit-1/plant",
                                         "amqp://u:pw@rabbit-2:5673/plant"])
    assert [(node.node, node.password) for node in config.addresses()] == [
        ("rabbit-1:5672", "pw"), ("rabbit-2:5673", "pw")]
    assert config.endpoint() == "amqp://u@rabbit-1:5672,rabbit-2:5673/plant?exchange=" \
        "fieldbridge.events"
    mixed = sink_config(tmp_path, urls=["amqp://a:pw@rabbit-1/", "amqp://b:pw@rabbit-2/"])
    assert mixed.broker_url() == "amqp://a@rabbit-1:5672/%2F,amqp://b@rabbit-2:5672/%2F"
    assert "pw" not in repr(config)


def test_source_takes_nodes_too(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"sources": [{
        "id": "queue", "protocol": "amqp", "hosts": ["a", "b"], "queue": {"name": "q"},
        "points": [{"name": "t", "path": "t"}]}]}), encoding="utf-8")
    (source,) = load_config(path).sources
    assert isinstance(source, AmqpSourceConfig)
    assert source.endpoint() == "amqp://guest@a:5672,b:5672/%2F?queue=q"


@pytest.mark.parametrize(("options", "message", "line"), [
    ({"host": "a", "hosts": ["b"]}, "give `host` or `hosts`, not both", 4),
    ({"url": "amqp://u:pw@a", "urls": ["amqp://u:pw@b"]}, "give `url` or `urls`, not both", 4),
    ({"urls": ["amqp://u:pw@a"], "hosts": ["b"]}, "give `urls` or hosts, not both", 4),
    ({"hosts": ["a", "b:70000"]}, "the port of a node is a number from 1 to 65535", 8),
    ({"hosts": ["a", "user@b"]}, "a node is `host` or `host:port`", 8),
    ({"hosts": ["a", "a:5672"]}, "node a:5672 is listed twice", 4),
    ({"hosts": []}, "at least 1 item", 6),
    ({"urls": ["amqp://u:pw@a", "http://u:pw@b"]}, "must start with amqp:// or amqps://", 8),
    ({"urls": ["amqps://u:pw@a", "amqp://u:pw@b"], "tls": {}}, "`tls` needs amqps:// urls", 4),
])
def test_node_errors_name_file_and_line_but_never_a_password(
    tmp_path: Path, options: dict[str, Any], message: str, line: int
) -> None:
    with pytest.raises(ConfigError) as caught:
        sink_config(tmp_path, **options)
    (issue,) = caught.value.issues
    assert message in issue.message
    assert (Path(issue.file).name, issue.line) == ("config.yaml", line)
    assert "pw" not in str(caught.value)


# --- the order in which nodes are tried ------------------------------------------------------

class FakeBroker:
    """Counting stand-in for pika's connection class: nodes in ``refusing`` refuse."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        self.refusing: set[str] = set()

    def __call__(self, *, parameters: pika.ConnectionParameters, on_open_callback: Any,
                 on_open_error_callback: Any, on_close_callback: Any,
                 custom_ioloop: asyncio.AbstractEventLoop) -> FakeConnection:
        node = f"{parameters.host}:{parameters.port}"
        self.attempts.append(node)
        connection = FakeConnection(on_close_callback, custom_ioloop)
        if node in self.refusing:
            custom_ioloop.call_soon(on_open_error_callback, connection,
                                    pika.exceptions.AMQPConnectionError("Connection refused"))
        else:
            custom_ioloop.call_soon(on_open_callback, connection)
        return connection


class FakeConnection:
    """An open connection that closes when asked."""

    def __init__(self, on_close: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.is_closed = self.is_closing = False
        self._on_close = on_close
        self._loop = loop

    def close(self) -> None:
        self.is_closed = True
        self._loop.call_soon(self._on_close, self,
                             pika.exceptions.ConnectionClosedByClient(200, "Normal shutdown"))


async def connect(config: AmqpSinkConfig, broker: FakeBroker, status: EndpointStatus) -> None:
    """One connection, opened and closed as a sink's ``run`` would."""
    session = AmqpSession("endpoint", step_timeout=1.0)
    try:
        await session.connect(config, broker, "test", status=status)
    finally:
        await session.close()


async def test_nodes_are_tried_round_robin_from_the_one_after_the_last_used(
    tmp_path: Path
) -> None:
    config = sink_config(tmp_path, hosts=["a", "b", "c"])
    broker = FakeBroker()
    status = EndpointStatus(name="rabbit", kind="sink", protocol="amqp", endpoint="e")
    await connect(config, broker, status)
    assert (broker.attempts, status.details["node"]) == (["a:5672"], "a:5672")
    await connect(config, broker, status)  # the connection to a was lost: b is next
    assert status.details["node"] == "b:5672"
    broker.refusing = {"c:5672"}
    await connect(config, broker, status)
    assert broker.attempts == ["a:5672", "b:5672", "c:5672", "a:5672"]
    assert status.details["node"] == "a:5672"
    assert status.last_error == "cannot connect: Connection refused (node c:5672)"
    assert status.error_category is ErrorCategory.TRANSIENT


async def test_a_round_in_which_every_node_fails_names_each(tmp_path: Path) -> None:
    config = sink_config(tmp_path, hosts=["a", "b"])
    broker = FakeBroker()
    broker.refusing = {"a:5672", "b:5672"}
    status = EndpointStatus(name="rabbit", kind="sink", protocol="amqp", endpoint="e")
    with pytest.raises(ConnectorError) as caught:
        await connect(config, broker, status)
    assert broker.attempts == ["a:5672", "b:5672"]  # one round, then the supervisor backs off
    assert caught.value.reason == (
        "all 2 nodes failed: cannot connect: Connection refused (node a:5672); "
        "cannot connect: Connection refused (node b:5672)")
    assert caught.value.category is ErrorCategory.TRANSIENT
    assert "node" not in status.details


async def test_one_node_keeps_the_plain_errors(tmp_path: Path) -> None:
    broker = FakeBroker()
    broker.refusing = {"a:5672"}
    status = EndpointStatus(name="rabbit", kind="sink", protocol="amqp", endpoint="e")
    with pytest.raises(ConnectorError) as caught:
        await connect(sink_config(tmp_path, host="a"), broker, status)
    assert caught.value.reason == "cannot connect: Connection refused"
    assert "node" not in status.details
