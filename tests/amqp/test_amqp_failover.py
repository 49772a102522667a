"""Failover between the nodes of a RabbitMQ cluster: the `hosts` and `urls` settings, the order
in which nodes are tried (with a counting fake connection), and a sink that loses the node it
publishes to and moves on to another, against two real, independent RabbitMQ nodes.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
import yaml
from helpers import free_port
from helpers.brokers import (
    AMQP_HOST,
    AMQP_PORT,
    SETTLE,
    BridgeRun,
    RabbitAdmin,
    unique,
    wait_until,
)

from bridge.core.model import Event, Quality, new_event_id
from bridge.core.status import ConnectionState, EndpointStatus
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


# --- two real nodes --------------------------------------------------------------------------

START_TIMEOUT = 90.0
"""Seconds a RabbitMQ node may take to start (about ten on a small machine)."""


def rabbitmq_command(name: str) -> str | None:
    """A RabbitMQ script. Debian's /usr/sbin wrappers switch to the `rabbitmq` user (and its
    home, hence its Erlang cookie) when run as root: the scripts behind them run as the test's
    own user, with the test's environment."""
    behind_wrapper = Path("/usr/lib/rabbitmq/bin") / name
    return str(behind_wrapper) if behind_wrapper.exists() else shutil.which(name)


class RabbitNode:
    """A RabbitMQ node of the test's own, independent of the shared one: its own node name,
    ports, Erlang cookie, data and logs under ``base``; no plugins."""

    def __init__(self, base: Path) -> None:
        server, ctl = rabbitmq_command("rabbitmq-server"), rabbitmq_command("rabbitmqctl")
        if server is None or ctl is None:
            message = "rabbitmq-server is not installed"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{message} (CI=true: brokers are required)")
            pytest.skip(message)
        self.rabbitmq_server, self.rabbitmqctl = server, ctl
        self.name = unique("fbtest-") + "@localhost"
        self.port = free_port()
        self.pid_file = base / "node.pid"
        distribution, cli = free_port(), free_port()
        base.mkdir(parents=True, exist_ok=True)
        (base / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n",
                                            encoding="utf-8")
        (base / "rabbitmq-env.conf").write_text("", encoding="utf-8")
        (base / "enabled_plugins").write_text("[].\n", encoding="utf-8")
        cookie = base / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex, encoding="ascii")
        cookie.chmod(0o400)
        self.environment = {
            **os.environ,
            "HOME": str(base),  # the Erlang cookie, for the node and for rabbitmqctl
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(distribution),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(cli),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(cli),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),  # not the system's
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(base / "log"),
            "RABBITMQ_PID_FILE": str(self.pid_file),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_CRASH_DUMP": str(base / "erl_crash.dump"),  # the node's, not in the checkout
        }
        self.pid: int | None = None

    async def _run(self, *arguments: str) -> None:
        process = await asyncio.create_subprocess_exec(
            *arguments, env=self.environment, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                output, _ = await process.communicate()
        except TimeoutError:
            process.kill()
            await process.wait()
            pytest.fail(f"{' '.join(arguments)} took more than {START_TIMEOUT:g}s")
        if process.returncode != 0:
            pytest.fail(f"{' '.join(arguments)} exited with {process.returncode}: "
                        f"{output.decode(errors='replace')[-2000:]}")

    async def ctl(self, *arguments: str) -> None:
        """Run ``rabbitmqctl`` against this node."""
        await self._run(self.rabbitmqctl, "-n", self.name, *arguments)

    async def start(self) -> None:
        """Start the node and wait until it accepts AMQP connections."""
        await self._run(self.rabbitmq_server, "-detached")
        await self.ctl("wait", str(self.pid_file), "--timeout", str(int(START_TIMEOUT)))

    async def stop(self) -> None:
        """Stop the node and its Erlang VM, and wait until the VM process is gone."""
        if self.pid is None and self.pid_file.exists():
            self.pid = int(self.pid_file.read_text(encoding="ascii").strip())
        if self.pid is None:
            return
        if self.running():
            await self.ctl("stop", str(self.pid_file))
        await wait_until(lambda: not self.running(), within=SETTLE,
                         what=f"the node's VM (pid {self.pid}) to exit")
        self.pid = None

    def running(self) -> bool:
        """Whether the node's VM process is alive (not gone, not a zombie)."""
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text(encoding="ascii")
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
async def private_rabbit(tmp_path: Path) -> AsyncIterator[RabbitNode]:
    """A second RabbitMQ node, started for the test and stopped after it."""
    node = RabbitNode(tmp_path / "rabbit-node")
    try:
        await node.start()
        yield node
    finally:
        try:
            await node.stop()
        finally:
            shutil.rmtree(node.environment["HOME"], ignore_errors=True)


def make_event(point: str, value: float) -> Event:
    """An event as a source hands it to the router."""
    now = time.time()
    return Event(id=new_event_id(), source="plant", point=point, value=value, unit="degC",
                 quality=Quality.GOOD, ts=now, received_at=now, protocol="modbus",
                 bridge="edge", tags={})


def take_all(port: int, queue: str) -> list[str]:
    """The message ids of every message in ``queue`` on the node at ``port``, consumed."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(AMQP_HOST, port))
    try:
        channel = connection.channel()
        ids: list[str] = []
        while True:
            method, properties, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(str(properties.message_id))
    finally:
        connection.close()


@pytest.mark.broker
async def test_stopping_the_node_in_use_moves_publishing_to_the_next_with_nothing_lost(
    tmp_path: Path, rabbit: RabbitAdmin, private_rabbit: RabbitNode
) -> None:
    exchange, queue = unique("fbtest.events."), unique("fbtest.failover.")
    rabbit.exchanges.append(exchange)
    rabbit.queues.append(queue)
    first, second = f"127.0.0.1:{private_rabbit.port}", f"{AMQP_HOST}:{AMQP_PORT}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "bridge": {"id": "edge", "state_dir": str(tmp_path / "state")},
        "api": {"enabled": False},
        "sinks": [{"id": "rabbit", "protocol": "amqp", "hosts": [first, second], "timeout": 5,
                   "exchange": {"name": exchange},
                   "topology": {"queues": [{"name": queue, "type": "quorum"}]}}],
    }, sort_keys=False), encoding="utf-8")
    produced: list[Event] = []

    async def produce(bridge: BridgeRun, count: int) -> None:
        events = [make_event(f"boiler.t{index % 7}", float(len(produced) + index))
                  for index in range(count)]
        produced.extend(events)
        for start in range(0, count, 100):
            await bridge.runtime.router.submit(events[start:start + 100])

    async with BridgeRun(path) as bridge:
        status = bridge.sink("rabbit").status
        await wait_until(lambda: status.state is ConnectionState.UP, what="the sink up")
        assert status.details["node"] == first
        await produce(bridge, 300)
        await bridge.delivered("rabbit", 300)

        # Events are waiting and in flight while the node in use goes down.
        await produce(bridge, 300)
        await private_rabbit.ctl("stop_app")
        await wait_until(lambda: status.details["node"] == second
                         and status.state is ConnectionState.UP, within=30,
                         what=f"the sink up on {second} (last error {status.last_error})")
        await produce(bridge, 300)
        await bridge.delivered("rabbit", len(produced), within=30)
        entry = bridge.runtime.sink_entry("rabbit")

    assert entry["details"]["node"] == second
    assert entry["endpoint"] == f"amqp://guest@{first},{second}/%2F?exchange={exchange}"
    # The node that failed, and why (the channel or the connection: whichever pika reports
    # first).
    assert "closed: 320 CONNECTION_FORCED" in entry["last_error"]
    assert entry["last_error"].endswith(f"(node {first})")
    # The nodes are not clustered: each has its own queue, and together they hold every
    # event at least once (those in flight at the stop may be on both).
    await private_rabbit.ctl("start_app")
    on_first = take_all(private_rabbit.port, queue)
    on_second = take_all(AMQP_PORT, queue)
    assert {event.id for event in produced} == set(on_first) | set(on_second)
    assert len(on_first) >= 300
    assert len(on_second) >= 300
